"""MultiMNIST (left / right digit), Cross-stitch architecture, equal weighting.

Cross-stitch (Misra et al. 2016): one staged LeNet per digit, cross-stitch units between stages.
The rest (data, optimiser, budget, ``:smoke``) is configs/multimnist.py's; options: ``mtl_jax.models.architectures``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "cross_stitch"
    config.model.trunk_kwargs.width = 1
    config.model.arch_kwargs.alpha_self = 1.0
    config.model.arch_kwargs.alpha_other = 1.0
    return config
