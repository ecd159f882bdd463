"""NYUv2 with LibMTL's model: a dilated ResNet-50 encoder (output stride 8) shared by the tasks and one
DeepLabV3 ASPP head per task (``mtl_jax.models.dense_resnet``, ``resnet_aspp``), hard parameter
sharing, equal weighting (LibMTL ``examples/nyu/main.py``; its README's command).

Data: the MTAN preprocessed NYUv2 (``mtl_jax.data.mtan_npy``) at ``:manual_dir=``, 288 x 384.
Protocol: Adam lr 1e-4 halved after 100 epochs (its README's ``--scheduler step``), batch 8, 200 epochs,
no augmentation (LibMTL's default).

Differences from LibMTL: its encoder starts from torchvision's ImageNet ResNet-50; no such weights ship
offline, so the encoder starts at random unless ``--config.model.pretrained_file=PATH`` names a user's
copy of torchvision's checkpoint (``resnet50-0676ba61.pth`` or ``-11ad3fa6.pth``, read without torch);
LibMTL's weight decay 1e-5 is torch Adam's L2 term, which optax's ``adam`` does not have (``adamw``
decays decoupled): it is left out.

``:smoke`` trains 20 steps on the committed 32 x 32 copy in ``tests/fixtures/standard/nyuv2`` with a
ResNet-18 encoder and 16-channel ASPP heads.
"""

import os

from mtl_jax.config import default_config, parse_arg, smoke

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures", "standard", "nyuv2")
STEPS_PER_EPOCH = 795 // 8


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, task="", manual_dir="", depth=50)
    config = default_config()
    config.data.name = "nyuv2"
    config.data.manual_dir = arg.manual_dir
    config.data.cache_in_memory = False
    config.data.tasks = (arg.task,) if arg.task else ()
    config.model.name = "resnet_aspp"
    config.model.arch_kwargs.depth = arg.depth
    config.optim.update(dict(name="adam", lr=1e-4, schedule="step", decay_every=100 * STEPS_PER_EPOCH,
                             decay_factor=0.5))
    config.batch_size = 8
    config.num_epochs = 200.0
    config.eval_split = "test"
    config.eval_batch_size = 8
    config.eval_every = 10 * STEPS_PER_EPOCH
    config.log_every = 50
    config.checkpoint.every = STEPS_PER_EPOCH
    if arg.smoke:
        smoke(config)
        config.data.manual_dir = arg.manual_dir or os.path.normpath(FIXTURE)
        config.data.height, config.data.width = 32, 32
        config.model.arch_kwargs.update(dict(depth=18, aspp_features=16))
        config.mesh.data = 1
        config.batch_size, config.eval_batch_size = 2, 2
        config.eval_every = 0
    return config
