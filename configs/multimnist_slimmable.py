"""MultiMNIST (left / right digit), a slimmable encoder + slimmable digit decoders.

Efficient Controllable Multi-Task Architectures (Aich et al., ICCV 2023): a LeNet-like encoder
(conv 5x5: 20, 40 channels) and one decoder per digit (dense over the 4x4x40 features: 128 units),
each runnable at width multipliers 0.25 / 0.5 / 0.75 / 1.0 with the same parameters.
``mtl-jax train`` trains the full width with the standard trainer; CIKD training of every width
and the budget search: ``experiments/controllable_mtl.py`` (``mtl_jax.train.slimmable``).
``:smoke`` shrinks it to a seconds-long run.
"""

import os

import ml_collections

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "slimmable"  # its own layers: model.trunk / head (and their kwargs) are not read
    config.model.trunk_kwargs = ml_collections.ConfigDict()
    config.model.head_kwargs = ml_collections.ConfigDict()
    config.model.arch_kwargs.update(dict(encoder_features=(20, 40), decoder_hidden=(128,), kernel_size=5,
                                         padding="VALID", widths=(0.25, 0.5, 0.75, 1.0)))
    return config
