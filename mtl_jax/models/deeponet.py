"""MT-DeepONet (Kumar, Goswami, Kontolati, Shields & Karniadakis 2024, "Synergistic Learning with
Multi-Task DeepONet for Efficient PDE Problem Solving", arXiv 2408.02198) on DeepONet (Lu et al.
2021, "Learning nonlinear operators via DeepONet", Eq. 2: ``G(v)(y) = sum_i b_i(v) t_i(y) + b_0``).

The branch net reads one input function per task — the source term (Fisher) or permeability
(Darcy) sampled on the grid, concatenated with the binary geometry mask (the paper's branch
input) — and the trunk net reads the grid coordinates (normalised to [0, 1]^d). The mask also
enters the loss (``losses.masked_mse``: masked-out points do not count).

Input ``[B, K, n_in]``: row k is an instance of task k (``mtl_jax.data.pde``); output
``{task: [B, P]}`` on the P points of ``grid_shape`` (C order). Parameter tree::

    shared/branch/dense_{i}   branch hidden layers, shared by all tasks
    shared/trunk/dense_{i}    trunk net (its last layer is activated too, as in DeepONet)
    heads/<task>/branch_out   the task's last branch layer -> p coefficients b_i
    heads/<task>/bias         the task's b_0

Deviation: the paper trains one DeepONet (all parameters shared) on the union of the tasks'
data; here each task also owns its last branch layer and bias (under ``heads/<task>``) so that
per-task heads, optimisers and MTL methods apply. ``num_points = prod(grid_shape)`` must match
every task's ``num_outputs``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.blocks import PerTask


def grid_coordinates(grid_shape: Sequence[int]) -> np.ndarray:
    """[prod(grid_shape), d] coordinates in [0, 1]^d of a tensor-product grid, flattened in C order."""
    axes = [np.linspace(0.0, 1.0, n) for n in grid_shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(grid_shape)).astype(np.float32)


class Dense(nn.Module):
    """``Dense -> tanh`` per entry of ``features`` (DeepONet's fully connected sub-networks)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = jnp.tanh(nn.Dense(width, name=f"dense_{i}")(x))
        return x


class DeepONetShared(nn.Module):
    """x [B, K, n_in] -> (branch features [B, K, H], trunk basis [P, p]); the trunk evaluates
    ``grid_coordinates(grid_shape)``."""

    num_tasks: int
    grid_shape: Sequence[int]
    branch_features: Sequence[int] = (128, 128)
    trunk_features: Sequence[int] = (128, 128, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 3 or x.shape[1] != self.num_tasks:
            raise ValueError(f"MT-DeepONet takes branch input [batch, num_tasks={self.num_tasks}, n_in] (one "
                             f"input function per task, mtl_jax.data.pde); got shape {tuple(x.shape)}")
        branch = Dense(tuple(self.branch_features), name="branch")(x.astype(jnp.float32))
        trunk = Dense(tuple(self.trunk_features), name="trunk")(jnp.asarray(grid_coordinates(self.grid_shape)))
        return branch, trunk


class DeepONetHead(nn.Module):
    """Task k's part: ``G_k(v)(y_j) = sum_i (W_k h + c_k)_i t_i(y_j) + b0_k``; h [B, H], trunk [P, p] -> [B, P]."""

    @nn.compact
    def __call__(self, h, trunk):
        coefficients = nn.Dense(trunk.shape[-1], name="branch_out")(h)
        bias = self.param("bias", nn.initializers.zeros, ())
        return coefficients @ trunk.T + bias


class MTDeepONet(nn.Module):
    """``apply(x [B, K, n_in]) -> {task: [B, P]}``; see the module docstring."""

    encoder: DeepONetShared
    task_names: Sequence[str]

    @nn.compact
    def __call__(self, x, train: bool = False):
        branch, trunk = self.encoder.clone(parent=self, name="shared")(x, train)
        heads = PerTask({t: DeepONetHead(parent=None) for t in self.task_names}, name="heads")
        return heads({t: (branch[:, k], trunk) for k, t in enumerate(self.task_names)})


def check_field_tasks(tasks: Sequence, num_points: int) -> None:
    """Every task must be a field regression with ``num_outputs == num_points``; else a ValueError naming it."""
    for t in tasks:
        if t.kind != "regression":
            raise ValueError(f"MT-DeepONet predicts fields: task '{t.name}' is of kind '{t.kind}'; it needs "
                             f"'regression' tasks (mtl_jax.data.pde.field_task)")
        if t.num_outputs != num_points:
            raise ValueError(f"MT-DeepONet: task '{t.name}' has {t.num_outputs} outputs but the model's grid has "
                             f"{num_points} points; set model.arch_kwargs.grid_shape to the data's grid")


def build_deeponet(cfg, tasks: Sequence) -> nn.Module:
    """MODELS['deeponet']: ``cfg.arch_kwargs`` are DeepONetShared's options (grid_shape, required;
    branch_features, trunk_features)."""
    from mtl_jax.models import _build
    from mtl_jax.models.architectures import _options

    options = _options(cfg, "arch_kwargs")
    if "grid_shape" not in options:
        raise ValueError("model 'deeponet' needs model.arch_kwargs.grid_shape (the data's grid, e.g. "
                         "mtl_jax.data.pde.fisher_grid_shape())")
    check_field_tasks(tasks, int(np.prod(options["grid_shape"])))
    shared = _build({"deeponet": DeepONetShared}, "deeponet", options, "model", num_tasks=len(tasks))
    return MTDeepONet(encoder=shared, task_names=tuple(t.name for t in tasks))
