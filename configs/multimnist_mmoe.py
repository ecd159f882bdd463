"""MultiMNIST (left / right digit), MMoE architecture, equal weighting.

MMoE (Ma et al. 2018): four shared LeNet experts, one softmax gate per digit. ``:smoke`` shrinks it
to a seconds-long run; options: ``mtl_jax.models.architectures``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "mmoe"
    config.model.trunk_kwargs.width = 1
    config.model.arch_kwargs.num_experts = 4
    return config
