"""MultiMNIST (left / right digit), UniFork: a Y-shaped ViT, equal weighting.

UniFork (2025): the small ViT of configs/multimnist_vit.py (patch 4, 4 blocks of width 64) with
its first ``arch_kwargs.shared_depth`` blocks shared and the rest one branch per digit.
``shared_depth=4`` is HPS on the ViT, ``0`` one transformer per task. ``:smoke`` shrinks it to a
seconds-long run; options: ``mtl_jax.models.unifork``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist_vit.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "unifork"
    config.model.arch_kwargs.shared_depth = config.model.trunk_kwargs.depth // 2
    return config
