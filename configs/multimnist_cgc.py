"""MultiMNIST (left / right digit), CGC architecture, equal weighting.

CGC (Tang et al. 2020): one shared and one task-specific LeNet expert per digit, one gate per digit.
The rest (data, optimiser, budget, ``:smoke``) is configs/multimnist.py's; options: ``mtl_jax.models.architectures``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "cgc"
    config.model.trunk_kwargs.width = 1
    config.model.arch_kwargs.num_shared_experts = 1
    config.model.arch_kwargs.num_specific_experts = 1
    return config
