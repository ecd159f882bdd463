"""CelebA, 40 binary attributes, a ResNet-18 trunk with one linear (sigmoid) head per attribute, equal
weighting; the training protocol of FAMO's CelebA experiment (Liu et al. 2023, ``experiments/celeba/``).

Data: ``mtl_jax.data.celeba`` (``img_align_celeba/`` + ``list_attr_celeba.txt`` + ``list_eval_partition.txt``,
official split, 64 x 64 as FAMO resizes) at ``:manual_dir=``. Tasks: ``tasks.binary`` (BCE on one logit, F1
accumulated over the split as FAMO's ``CelebaMetrics``). Protocol: Adam lr 3e-4, batch 256, 15 epochs.

Differences from FAMO: its network is 7 conv + 2 FC shared layers (``experiments/celeba/models.py``);
issue 30 asks for ResNet-18 (``model.trunk='resnet18'``, torchvision's layout, random init); FAMO picks
the epoch of best validation F1 and reports its test F1: here ``eval_split`` is 'validation' during
training (``eval_every``, one epoch) and the test split is evaluated with ``--config.eval_split=test``.

``:smoke`` trains 20 steps on the committed 4-image copy in ``tests/fixtures/standard/celeba`` at 32 x 32.
"""

import os

from mtl_jax.config import default_config, parse_arg, smoke

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures", "standard", "celeba")
STEPS_PER_EPOCH = 162_770 // 256


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="", manual_dir="")
    config = default_config()
    config.data.name = "celeba"
    config.data.manual_dir = arg.manual_dir
    config.data.cache_in_memory = False  # 162,770 train images
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.name = "hps"
    config.model.trunk = "resnet18"
    config.model.trunk_kwargs = {}
    config.model.head = "linear"
    config.model.head_kwargs = {}
    config.optim.update(dict(name="adam", lr=3e-4, schedule="constant"))
    config.batch_size = 256
    config.num_epochs = 15.0
    config.eval_split = "validation"
    config.eval_batch_size = 1000
    config.eval_every = STEPS_PER_EPOCH
    config.log_every = 100
    config.checkpoint.every = STEPS_PER_EPOCH
    if arg.smoke:
        smoke(config)
        config.data.manual_dir = arg.manual_dir or os.path.normpath(FIXTURE)
        config.data.image_size = 32
        config.mesh.data = 1
        config.batch_size, config.eval_batch_size = 2, 2
        config.eval_every = 0
    return config
