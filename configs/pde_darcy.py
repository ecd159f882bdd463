"""MT-DeepONet on the 2D Darcy flow -div(k grad u) = 10, one task per geometry (square, lshape,
hole; ``mtl_jax.data.pde``), random log-normal permeability k; geometry mask in the branch
input and in the loss (masked MSE); test metric relative L2.

The Fisher-KPP config (``configs/pde_fisher.py``) on the Darcy data and grid. ``:smoke`` shrinks it
to a seconds-long run; ``:task=lshape`` trains a single-task DeepONet.
"""

import os

from mtl_jax.config import load_config
from mtl_jax.data.pde import darcy_grid_shape

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pde_fisher.py")


def get_config(arg=None):
    config = load_config(f"{BASE}:{arg}" if arg else BASE)
    config.data.name = "pde_darcy"
    config.model.arch_kwargs.grid_shape = darcy_grid_shape()
    return config
