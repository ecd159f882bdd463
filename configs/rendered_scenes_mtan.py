"""Rendered indoor scenes (13-class segmentation, depth, surface normals), MTAN on SegNet at reduced
width, equal weighting: the NYUv2 protocol of MTAN / Nash-MTL / FAMO scaled down to a CPU.

The protocol (Liu et al. 2019; Nash-MTL App. B): MTAN-SegNet, Adam lr 1e-4 halved after half the run,
batch 2, 200 epochs over NYUv2's 795 images at 288x384. Here: ``mtl_jax.data.rendered_scenes`` at 64x96
(``:height=``, ``:width=``: multiples of 32), SegNet filters x``model_width`` (0.25: 16-32-64-128-128),
Adam with a cosine decay from a larger rate (few steps: ``lr``), batch 16, ``steps`` steps. ``:task=<name>``
trains the single-task baseline of the same config (the same model with one task); ``:smoke`` shrinks it
to a seconds-long run. Options: ``num_train``, ``num_test``, ``steps``, ``model_width``, ``batch``, ``lr``.
"""

from mtl_jax.config import default_config, parse_arg, smoke
from mtl_jax.data.rendered_scenes import NUM_TEST, NUM_TRAIN

TASKS = ("segmentation", "depth", "normal")


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="", height=64, width=96, num_train=NUM_TRAIN, num_test=NUM_TEST,
                    steps=3000, model_width=0.25, batch=16, lr=1e-3)
    config = default_config()
    config.data.name = "rendered_scenes"
    config.data.height, config.data.width = arg.height, arg.width
    config.data.num_train, config.data.num_test = arg.num_train, arg.num_test
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.name = "mtan_segnet"
    config.model.arch_kwargs.width = arg.model_width
    config.optim.update(dict(name="adam", lr=arg.lr, schedule="cosine"))
    config.batch_size = arg.batch
    config.eval_batch_size = 100
    config.num_steps = arg.steps
    config.log_every = 100
    config.checkpoint.every = 500
    if arg.smoke:
        smoke(config)
        config.data.height, config.data.width = 32, 32
        config.data.num_train, config.data.num_test = 16, 8
        config.model.arch_kwargs.width = 0.0625
        config.batch_size, config.eval_batch_size = 8, 8  # tests split batches over 8 devices
    return config
