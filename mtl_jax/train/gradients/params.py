"""Parameter-level per-task gradients: the training forward linearised once, the Gramian built
layer by layer, by VJP + JVP columns or from the materialised Jacobian, and the method's weights
applied to every parameter group (``combine.task_gradients``)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.train.forward import sows_aux_loss
from mtl_jax.train.gradients import layerwise as layerwise_gramian
from mtl_jax.train.gradients.base import Linearization, StepContext, Strategy, TaskGradients
from mtl_jax.train.gradients.combine import task_gradients
from mtl_jax.train.gradients.double_sampling import cross_gramian_of_halves
from mtl_jax.train.gradients.jacobian import linearize
from mtl_jax.train.gradients.options import GradientOptions
from mtl_jax.train.gradients.representation import representation_losses_and_vjp
from mtl_jax.train.precision import FLOAT32, Precision, cast_params


def make_split_of(model, tasks: Sequence, input_key: str, split_forward) -> Callable:
    """``split_of(params, model_state, batch) -> (encode, decode) | None``: the heads-once split
    (``split_forward``, from ``forward.make_representation_forward``) when it applies, i.e. a trunk +
    heads model without mutable state or auxiliary losses (decided at trace time)."""

    def split_of(params, model_state, batch):
        if split_forward is None or model_state or sows_aux_loss(model, params, batch, input_key, tasks):
            return None
        return split_forward

    return split_of


def make_linearize(forward, names: Sequence[str], by_jvp: bool, by_layer: bool, chunk: int,
                   precision: Precision = FLOAT32) -> Callable:
    """``linearize(params, model_state, batch, key, split) -> Linearization`` of the training forward:
    a JVP too when the Gramian is built by JVPs (``by_jvp``), the layer-wise rows when it is built
    layer by layer (``by_layer``); with ``split`` (``make_split_of``) the heads are differentiated once
    (``representation_losses_and_vjp``). ``precision``: the policy ``forward`` casts with. ``rows=False``
    skips the layer-wise rows (a method fed the cross Gramian of half batches reads none: its ``J^T w``
    is one VJP)."""

    def linearization(params, model_state, batch, key, split, rows: bool = True) -> Linearization:
        fn = lambda p: forward(p, model_state, batch, key, True)
        by_layer_here = by_layer and rows
        if split is not None:
            lin = representation_losses_and_vjp(*split, params, batch, key, names, by_jvp, by_layer_here, chunk,
                                                precision)
            return lin._replace(model_state=model_state)
        if by_jvp:
            losses, vjp_fn, jvp_fn, (preds, new_state) = linearize(fn, params, has_aux=True)
            return Linearization(losses, vjp_fn, jvp_fn, None, preds, new_state)
        if by_layer_here:
            losses, vjp_fn, rows_fn, (preds, new_state) = layerwise_gramian.vjp_and_layerwise_gramian(
                fn, params, lambda p: p["shared"], has_aux=True, prepare=lambda p: cast_params(precision, p))
            rows = rows_fn(jnp.eye(losses.shape[0], dtype=losses.dtype), chunk)
            return Linearization(losses, vjp_fn, None, rows, preds, new_state)
        losses, vjp_fn, (preds, new_state) = jax.vjp(fn, params, has_aux=True)
        return Linearization(losses, vjp_fn, None, None, preds, new_state)

    return linearization


def params_level(method, options: GradientOptions, forward, linearization, split_of, names: Sequence[str],
                 double_sampling: bool, precision: Precision = FLOAT32) -> Strategy:
    """The plain step's strategy: one linearisation of the forward, the cross Gramian of the batch's
    two halves when the method wants it (``double_sampling``; the whole batch's layer-wise rows are then
    not formed: the method reads the cross Gramian and its ``J^T w`` is one VJP), then
    ``task_gradients``."""

    def gradients(ctx: StepContext) -> TaskGradients:
        split = split_of(ctx.params, ctx.model_state, ctx.batch)
        lin = linearization(ctx.params, ctx.model_state, ctx.batch, ctx.key, split, rows=not double_sampling)
        cross = (cross_gramian_of_halves(forward, ctx.params, ctx.model_state, ctx.batch, ctx.key, lin.losses.shape[0],
                                         options, split, names, precision) if double_sampling else None)
        grads, weights, method_state = task_gradients(method, lin.losses, lin.vjp_fn, ctx.method_state, ctx.step,
                                                      ctx.method_key, options, lin.jvp_fn, ctx.params, cross,
                                                      lin.layer_rows)
        return TaskGradients(grads, weights, method_state, lin.losses, lin.predictions, lin.model_state)

    return gradients
