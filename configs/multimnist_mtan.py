"""MultiMNIST (left / right digit), MTAN architecture, equal weighting.

MTAN (Liu et al. 2019): a shared staged LeNet with per-digit attention masks at each stage.
The rest (data, optimiser, budget, ``:smoke``) is configs/multimnist.py's; options: ``mtl_jax.models.architectures``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "mtan"
    return config
