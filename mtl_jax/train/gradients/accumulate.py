"""Gradient accumulation with MTL semantics: per-task gradient rows summed over micro-batches, the
method applied once per step.

The batch [B, ...] is split into M micro-batches (micro-batch m holds rows m, m + M, m + 2M, ...,
so each stays inside every device's shard of the batch axis). A ``lax.scan`` over them sums the
per-task losses ``L^(m) [K]``, the per-task shared-gradient rows ``J^(m)`` (leaves [K, ...], one
vmapped VJP) and every head's own gradient, carrying the model state (batch statistics). Then the
method sees ``L = mean_m L^(m)`` and ``J = mean_m J^(m)``, exactly the full batch's losses and
Jacobian when every micro-batch labels each task on equally many examples (linear in the gradient,
so every method, Gramian ones included, gets the full-batch ``G = J J^T``): one ``aggregate``, the
shared gradient ``J^T w`` (or the method's direction), head k ``w_k g_k`` (loss weighting) or ``g_k``.
Peak memory: one micro-batch's activations plus the K x P_shared rows. Models with dropout draw
one key per micro-batch; batch statistics are per micro-batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.train.gradients.base import StepContext, Strategy, TaskGradients
from mtl_jax.train.gradients.combine import aggregate, head_weights
from mtl_jax.train.gradients.jacobian import per_task_jacobian
from mtl_jax.train.gradients.representation import scale_head_rows


def micro_batches_of(batch: dict, num: int) -> dict:
    """Every leaf [B, ...] -> [num, B / num, ...]: micro-batch m is rows m, m + num, ... of the batch."""
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % num:
        raise ValueError(f"grad_accum_steps={num} must divide the batch size; got leading sizes {sorted(sizes)}")
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), batch)


def interleave(stacked):
    """Inverse of ``micro_batches_of`` on outputs: leaves [num, B / num, ...] -> [B, ...] in batch order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), stacked)


def accumulate(method, forward, num_micro: int, names: Sequence[str], last_shared=None) -> Strategy:
    """The parameter-level strategy over ``num_micro`` micro-batches (module docstring).
    ``last_shared``: GradNorm's layer selector over the stacked rows."""
    num_tasks = len(names)

    def gradients(ctx: StepContext) -> TaskGradients:
        micro = micro_batches_of(ctx.batch, num_micro)
        keys = jax.random.split(ctx.key, num_micro)

        def one(carry, inputs):
            model_state, losses_sum, rows_sum, heads_sum = carry
            batch, key = inputs
            fn = lambda p: forward(p, model_state, batch, key, True)
            losses, vjp_fn, (preds, new_state) = jax.vjp(fn, ctx.params, has_aux=True)
            rows = per_task_jacobian(lambda c: (vjp_fn(c)[0]["shared"],), num_tasks, losses.dtype)
            (own,) = vjp_fn(jnp.ones_like(losses))  # head k's own gradient (L_k alone reads head k)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            return (new_state, losses_sum + losses, add(rows_sum, rows), add(heads_sum, own["heads"])), preds

        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
        shared_rows = jax.tree.map(lambda x: jnp.zeros((num_tasks,) + x.shape, jnp.float32), ctx.params["shared"])
        init = (ctx.model_state, jnp.zeros((num_tasks,), jnp.float32), shared_rows, zeros(ctx.params["heads"]))
        (model_state, losses, rows, heads), preds = jax.lax.scan(one, init, (micro, keys))
        mean = lambda tree: jax.tree.map(lambda x: x / num_micro, tree)
        losses, rows, heads = losses / num_micro, mean(rows), mean(heads)
        shared, weights, method_state = aggregate(method, losses, rows, ctx.method_state, ctx.step, ctx.method_key,
                                                  last_shared)
        heads = scale_head_rows(heads, head_weights(method, weights, method_state), names)
        return TaskGradients({"shared": shared, "heads": heads}, weights, method_state, losses, interleave(preds),
                             model_state)

    return gradients
