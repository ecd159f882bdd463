"""Learning to Branch (Guo, Lee & Ulbricht 2020, ICML, Sec. 3), as LibMTL's ``LTB`` implements it.

One column (a copy of a staged trunk) per task. Before stage i (i >= 1), column k takes as input
the output of stage i-1 of the column its branching distribution picks:

    input of stage i in column k = sum_j A_i[k, j] * output of stage i-1 in column j

with A_i[k] = Gumbel-softmax(logits_i[k], tau), hard (one-hot forward, straight-through gradient;
paper Sec. 3.2, Eq. 4). LibMTL's schedule, in epochs e of ``epochs``: warm-up A = all ones while
e < epochs / 100 (every column sums all parents), then tau = epochs / 20 / sqrt(e + 1). The logits
start at 1 (uniform branching). Here e = step // ``steps_per_epoch``, the step being counted in the
``schedule`` variable collection (trainer: model state) on every training call. In evaluation
(train=False) the branches are the argmax of the logits (the warm-up's all-ones before), where
LibMTL samples Gumbel noise in evaluation too.

Parameters (every loss reaches every column, so the columns are shared, each under its task)::

    shared/columns/<task>/stage_{i}/...   column of task t
    shared/branch_logits                  [S-1, K, K], rows: child column, columns: parent
    heads/<task>/...                      head of task t

``intermediates``: ``shared/branch_probs`` (softmax of the logits) and ``shared/branching`` (A).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.blocks import PerTask, mixed_columns, sow_unless_init


def ltb_temperature(epoch, epochs: int):
    """LibMTL's Gumbel-softmax temperature: epochs / 20 / sqrt(epoch + 1)."""
    return epochs / 20.0 / jnp.sqrt(jnp.asarray(epoch, jnp.float32) + 1.0)


def ltb_warming_up(epoch, epochs: int):
    """True during LibMTL's warm-up, epoch < epochs / 100."""
    return jnp.asarray(epoch, jnp.float32) < epochs / 100.0


def gumbel_softmax_hard(key, logits, tau):
    """One-hot samples of Gumbel-softmax(logits / tau) over the last axis with the straight-through
    gradient of the soft sample (Jang et al. 2017, Sec. 2.2). logits [..., N] -> [..., N]."""
    soft = jax.nn.softmax((logits + jax.random.gumbel(key, logits.shape, logits.dtype)) / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=logits.dtype)
    return hard + (soft - jax.lax.stop_gradient(soft))  # forward: exactly one-hot


def ltb_branching(logits, epoch, epochs: int, key=None):
    """Branching matrices A [S-1, K, K] from logits [S-1, K, K] at ``epoch``: all ones in warm-up,
    else hard Gumbel-softmax samples (``key`` given: training) or the argmax (``key`` None)."""
    if key is None:
        chosen = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)
    else:
        chosen = gumbel_softmax_hard(key, logits, ltb_temperature(epoch, epochs))
    return jnp.where(ltb_warming_up(epoch, epochs), jnp.ones_like(logits), chosen)


class LTBColumns(nn.Module):
    """The task columns joined by learned branching: x [B, ...] -> {task: [B, D]}."""

    encoder: nn.Module  # a staged trunk (staged.STAGED_TRUNKS)
    tasks: tuple
    epochs: int = 100
    steps_per_epoch: int = 100

    @nn.compact
    def __call__(self, x, train: bool = False):
        num_stages, num_tasks = len(self.encoder.stages()), len(self.tasks)
        logits = self.param("branch_logits", nn.initializers.ones, (num_stages - 1, num_tasks, num_tasks))
        step = self.variable("schedule", "step", lambda: jnp.zeros((), jnp.int32))
        epoch = step.value // self.steps_per_epoch
        branching = ltb_branching(logits, epoch, self.epochs, self.make_rng("dropout") if train else None)
        if train and self.is_mutable_collection("schedule") and not self.is_initializing():
            step.value = step.value + 1
        sow_unless_init(self, "branch_probs", jax.nn.softmax(logits, axis=-1))
        sow_unless_init(self, "branching", branching)
        return mixed_columns(self.encoder, self.tasks, x, train, branching)


class LTB(nn.Module):
    """Learning-to-Branch over a staged trunk (module docstring). x [B, ...] -> {task: [B, n_t]}."""

    encoder: nn.Module  # a staged trunk (staged.STAGED_TRUNKS)
    heads: Mapping[str, nn.Module]
    epochs: int = 100
    steps_per_epoch: int = 100

    @nn.compact
    def __call__(self, x, train: bool = False):
        reps = LTBColumns(self.encoder, tuple(self.heads), self.epochs, self.steps_per_epoch, name="shared")(x, train)
        return PerTask(self.heads, name="heads")({t: (reps[t], train) for t in self.heads})
