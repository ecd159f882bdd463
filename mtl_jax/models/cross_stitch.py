"""Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert 2016, CVPR, Sec. 3; LibMTL ``Cross_stitch``).

One column (a copy of a staged trunk) per task; between stage i-1 and stage i a cross-stitch unit
alpha_i [K, K] linearly recombines the task streams (paper Eq. 1, one scalar per task pair as in
LibMTL):

    input of stage i in column k = sum_j alpha_i[k, j] * output of stage i-1 in column j

The last stage's output of column k [B, D] feeds head k. ``alpha_self`` / ``alpha_other`` initialise
the diagonal / off-diagonal entries: LibMTL initialises every entry to 1 (the default here); the
paper's (0.9, 0.1); (1, 0) starts from independent single-task networks.

Parameters: every task's loss reaches every column through the units, so, as in LibMTL (whose
shared parameters are the whole encoder), the columns are shared parameters, each under its task::

    shared/columns/<task>/stage_{i}/...   column of task t
    shared/cross_stitch                   [S-1, K, K], units in task order
    heads/<task>/...                      head of task t
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax.numpy as jnp

from mtl_jax.models.blocks import PerTask, mixed_columns


def cross_stitch_init(alpha_self: float, alpha_other: float):
    """Initialiser of the units [S-1, K, K]: alpha_self on each diagonal, alpha_other elsewhere."""

    def init(key, shape, dtype=jnp.float32):
        eye = jnp.eye(shape[-1], dtype=dtype)
        return jnp.broadcast_to(alpha_self * eye + alpha_other * (1 - eye), shape)

    return init


class CrossStitchColumns(nn.Module):
    """The task columns joined by cross-stitch units: x [B, ...] -> {task: [B, D]}."""

    encoder: nn.Module  # a staged trunk (staged.STAGED_TRUNKS)
    tasks: tuple
    alpha_self: float = 1.0
    alpha_other: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        num_stages, num_tasks = len(self.encoder.stages()), len(self.tasks)
        units = self.param("cross_stitch", cross_stitch_init(self.alpha_self, self.alpha_other),
                           (num_stages - 1, num_tasks, num_tasks))
        return mixed_columns(self.encoder, self.tasks, x, train, units)


class CrossStitch(nn.Module):
    """Cross-stitch network over a staged trunk (module docstring). x [B, ...] -> {task: [B, n_t]}."""

    encoder: nn.Module  # a staged trunk (staged.STAGED_TRUNKS)
    heads: Mapping[str, nn.Module]
    alpha_self: float = 1.0
    alpha_other: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        reps = CrossStitchColumns(self.encoder, tuple(self.heads), self.alpha_self, self.alpha_other,
                                  name="shared")(x, train)
        return PerTask(self.heads, name="heads")({t: (reps[t], train) for t in self.heads})
