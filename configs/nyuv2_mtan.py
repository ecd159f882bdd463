"""NYUv2 (13-class segmentation, depth, surface normals), MTAN on SegNet, equal weighting: the protocol
of MTAN / Nash-MTL / FAMO (Liu et al. 2019; Navon et al. 2022 App. B; FAMO and Nash-MTL
``experiments/nyuv2/trainer.py``; LibMTL ``examples/nyu/main_segnet.py``).

Data: the MTAN preprocessed copy (``mtl_jax.data.mtan_npy``: ``{train,val}/{image,label,depth,normal}/N.npy``,
288 x 384, 795 train / 654 test) at ``:manual_dir=/path/to/nyuv2``. Protocol: MTAN-SegNet (full width),
Adam lr 1e-4 halved after 100 epochs (``StepLR(100, 0.5)``: schedule 'step'), no weight decay, batch 2,
200 epochs, MTAN's RandomScaleCrop + flip on the training images (``data.augment``); the test split is
the on-disk ``val``.

Difference from the papers: they report the mean test metrics of the last 10 epochs; here the test
split is evaluated every 10 epochs, and that mean is computed from ``metrics.jsonl``.

``:smoke`` trains 20 steps on the committed 32 x 32 copy in ``tests/fixtures/standard/nyuv2`` at width
1/16; ``:task=segmentation`` trains one task (single-task baseline); ``:model_width=`` scales SegNet.
"""

import os

from mtl_jax.config import default_config, parse_arg, smoke

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures", "standard", "nyuv2")
STEPS_PER_EPOCH = 795 // 2


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="", manual_dir="", model_width=1.0)
    config = default_config()
    config.data.name = "nyuv2"
    config.data.manual_dir = arg.manual_dir
    config.data.cache_in_memory = False  # ~4 MB per example at 288 x 384
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.name = "mtan_segnet"
    config.model.arch_kwargs.width = arg.model_width
    config.data.augment = True
    config.optim.update(dict(name="adam", lr=1e-4, weight_decay=0.0, schedule="step",
                             decay_every=100 * STEPS_PER_EPOCH, decay_factor=0.5))
    config.batch_size = 2
    config.num_epochs = 200.0
    config.eval_split = "test"
    config.eval_batch_size = 6
    config.eval_every = 10 * STEPS_PER_EPOCH
    config.log_every = 100
    config.checkpoint.every = STEPS_PER_EPOCH
    if arg.smoke:
        smoke(config)
        config.data.manual_dir = arg.manual_dir or os.path.normpath(FIXTURE)
        config.data.height, config.data.width = 32, 32
        config.model.arch_kwargs.width = 0.0625
        config.mesh.data = 1
        config.batch_size, config.eval_batch_size = 2, 2
        config.eval_every = 0
        config.optim.decay_every = 10
    return config
