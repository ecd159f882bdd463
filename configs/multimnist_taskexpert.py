"""MultiMNIST (left / right digit), TaskExpert on a small ViT, equal weighting.

TaskExpert (Ye & Xu, ICCV 2023): after every block of the ViT of configs/multimnist_vit.py, four
task-generic MLP experts, a per-token softmax gate per digit over [experts; the digit's feature
memory], and the memory update. ``:smoke`` shrinks it to a seconds-long run; options:
``mtl_jax.models.taskexpert``.
"""

import os

from mtl_jax.config import load_config

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multimnist_vit.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.model.name = "taskexpert"
    config.model.arch_kwargs.update(dict(num_experts=4, expert_dim=config.model.trunk_kwargs.dim, gating="token"))
    return config
