"""MultiMNIST (left / right digit), PLE architecture, equal weighting.

PLE (Tang et al. 2020): CGC at each of the three stages of staged-LeNet experts. ``:smoke`` shrinks
it to a seconds-long run; options: ``mtl_jax.models.architectures``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "ple"
    config.model.trunk_kwargs.width = 1
    config.model.arch_kwargs.num_shared_experts = 1
    config.model.arch_kwargs.num_specific_experts = 1
    return config
