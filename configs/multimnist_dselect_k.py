"""MultiMNIST (left / right digit), DSelect-k architecture, equal weighting.

DSelect-k (Hazimeh et al. 2021): four shared LeNet experts, each digit selects two. ``:smoke``
shrinks it to a seconds-long run; options: ``mtl_jax.models.architectures``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "dselect_k"
    config.model.trunk_kwargs.width = 1
    config.model.arch_kwargs.num_experts = 4
    config.model.arch_kwargs.num_nonzeros = 2
    config.model.arch_kwargs.kgamma = 1.0
    return config
