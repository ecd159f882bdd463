"""Cityscapes (7-class segmentation and depth), MTAN on SegNet, equal weighting: the protocol of FAMO
(``experiments/cityscapes/trainer.py``) and Nash-MTL's Cityscapes table (Navon et al. 2022 App. B).

Data: MTAN's 128 x 256 preprocessed copy (``mtl_jax.data.mtan_npy``: ``{train,val}/{image,label_7,
label_19,depth}/N.npy``, or LibMTL's ``cityscapes2`` with ``label/``), 2,975 train / 500 test, at
``:manual_dir=``; ``:classes=19`` for the 19-class labels. Protocol: MTAN-SegNet, Adam lr 1e-4 halved
at epoch 100, batch 8, 200 epochs, RandomScaleCrop + flip; the test split is the on-disk ``val``.

Difference from the papers, as in ``configs/nyuv2_mtan.py``: the mean of the last 10 epochs is computed
from ``metrics.jsonl``.

``:smoke`` trains 20 steps on the committed 32 x 32 copy in ``tests/fixtures/standard/cityscapes``.
"""

import os

from mtl_jax.config import default_config, parse_arg, smoke

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures", "standard",
                       "cityscapes")
STEPS_PER_EPOCH = 2975 // 8


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="", manual_dir="", classes=7, model_width=1.0)
    config = default_config()
    config.data.name = "cityscapes"
    config.data.manual_dir = arg.manual_dir
    config.data.num_classes = arg.classes
    config.data.cache_in_memory = False
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.name = "mtan_segnet"
    config.model.arch_kwargs.width = arg.model_width
    config.data.augment = True
    config.optim.update(dict(name="adam", lr=1e-4, weight_decay=0.0, schedule="step",
                             decay_every=100 * STEPS_PER_EPOCH, decay_factor=0.5))
    config.batch_size = 8
    config.num_epochs = 200.0
    config.eval_split = "test"
    config.eval_batch_size = 20
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
