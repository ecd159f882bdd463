"""Rep-MTL as a gradient strategy: the loss-weighting method's ``sum_k w_k L_k`` plus the
saliency regularisers of ``train/rep_mtl.py``, differentiated through the representation.

The shared representation ``z`` may be a vector [B, D] or a spatial map [B, H, W, C] (a dense
model's shared decoder output, the paper's NYUv2 / Cityscapes setting): the saliency
``S_t = dL_t/dz`` then has one entry per position and channel, and TSR / CSA read it per position
(``train/rep_mtl.py``). ``rep_mtl_model_gradients`` also runs models with batch statistics
(``model_state``, e.g. SegNet's BatchNorm): the trunk's and the heads' statistics are updated by the
one training forward, as the whole model's forward updates them. The auxiliary losses the model sows
(MoE load balancing, AiT's token loss) are part of the task losses, as in ``forward.make_forward``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.train import rep_mtl
from mtl_jax.models.moe_layers import AUX_LOSS
from mtl_jax.train.forward import aux_task_losses, has_representation, make_task_losses, takes, training_targets
from mtl_jax.train.gradients.base import StepContext, Strategy, TaskGradients
from mtl_jax.train.methods import MethodInputs
from mtl_jax.train.precision import FLOAT32, Precision, cast_input, cast_params, to_float32


def make_stateful_representation_forward(model, tasks: Sequence, input_key: str, precision: Precision = FLOAT32):
    """``(encode, decode)`` of a trunk + heads model that threads its mutable collections.

    ``encode(shared_params, model_state, batch, key, train) -> ((z, aux_losses), model_state)``: the
    trunk (``stage='trunk'``) and the auxiliary losses [K] it sows (``forward.aux_task_losses``; zeros
    when none); ``decode(head_params, model_state, z, batch, key, train) -> (losses [K], (predictions,
    model_state))``: the heads (``stage='heads'``), their losses plus the auxiliary losses the heads sow
    (e.g. AiT's token loss: in training the heads get ``forward.training_targets``, as in
    ``forward.make_forward``). So ``decode``'s losses + ``encode``'s aux losses are ``make_forward``'s
    training losses. In training the collections of ``model_state`` (``batch_stats``) are mutable and
    returned updated (the trunk's by encode, the heads' by decode); in evaluation they are read and
    nothing is sown. ``precision`` as in ``forward.make_forward``.
    """
    if not has_representation(model):
        raise ValueError(f"Rep-MTL needs a model with one shared representation (trunk + heads, e.g. 'hps', "
                         f"'segnet_split'); got {type(model).__name__}")
    task_losses = make_task_losses(tasks)
    num_tasks = len(tasks)
    wants_targets = takes(model, "targets")

    def run(params, model_state, x, key, train, **kwargs):
        """``(output, model_state, aux_losses [K])``."""
        variables = {"params": params, **model_state}
        if not train:
            return (model.apply(variables, x, train, rngs={"dropout": key}, **kwargs), model_state,
                    jnp.zeros((num_tasks,), jnp.float32))
        out, updated = model.apply(variables, x, train, rngs={"dropout": key}, mutable=list(model_state) + [AUX_LOSS],
                                   **kwargs)
        updated = dict(updated)
        aux = aux_task_losses(to_float32(updated.pop(AUX_LOSS, {})), num_tasks)
        return out, {**model_state, **updated}, aux

    def encode(shared_params, model_state, batch, key, train):
        shared_params = cast_params(precision, {"shared": shared_params})["shared"]
        z, model_state, aux = run({"shared": shared_params}, model_state, cast_input(precision, batch[input_key]), key,
                                  train, stage="trunk")
        return (z, aux), model_state

    def decode(head_params, model_state, z, batch, key, train):
        head_params = cast_params(precision, {"heads": head_params})["heads"]
        kwargs = {"targets": training_targets(tasks, batch)} if train and wants_targets else {}
        preds, model_state, aux = run({"heads": head_params}, model_state, z, key, train, stage="heads", **kwargs)
        preds = to_float32(preds) if precision.mixed else preds
        return task_losses(preds, batch) + aux, (preds, model_state)

    return encode, decode


def _stateful_gradients(method, rep_cfg, encode: Callable, decode: Callable) -> Strategy:
    """The strategy for a stateful ``(encode, decode)`` pair (``make_stateful_representation_forward``).

    The task losses are ``decode``'s (the heads' losses and auxiliary losses: the saliencies
    ``dL_k/dz`` include the heads' auxiliary terms) plus the trunk's auxiliary losses, whose gradient
    reaches the shared parameters through ``encode``'s VJP with the method's weights."""

    def gradients(ctx: StepContext) -> TaskGradients:
        enc_key, dec_key = jax.random.split(ctx.key)
        (z, trunk_aux), encode_vjp, model_state = jax.vjp(
            lambda p: encode(p, ctx.model_state, ctx.batch, enc_key, True), ctx.params["shared"], has_aux=True)

        def objective(head_params, zz):
            reg, aux = rep_mtl.rep_mtl_loss(lambda z_: decode(head_params, model_state, z_, ctx.batch, dec_key, True),
                                            zz, has_aux=True, tsr_weight=rep_cfg.tsr_weight,
                                            csa_weight=rep_cfg.csa_weight, temperature=rep_cfg.temperature)
            return (aux["losses"], reg), aux["decode_aux"]

        (head_losses, _), objective_vjp, (preds, new_state) = jax.vjp(objective, ctx.params["heads"], z, has_aux=True)
        losses = head_losses + trunk_aux.astype(head_losses.dtype)
        weights, method_state = method.update(MethodInputs(losses=losses, step=ctx.step), ctx.method_state,
                                              ctx.method_key)
        weights = jax.lax.stop_gradient(weights).astype(losses.dtype)
        head_grads, z_cotangent = objective_vjp((weights, jnp.ones((), losses.dtype)))
        (shared,) = encode_vjp((z_cotangent.astype(z.dtype), weights.astype(trunk_aux.dtype)))
        return TaskGradients({"shared": shared, "heads": head_grads}, weights, method_state, losses, preds,
                             new_state)

    return gradients


def rep_mtl_model_gradients(method, rep_cfg, model, tasks: Sequence, input_key: str,
                            precision: Precision = FLOAT32) -> Strategy:
    """Rep-MTL on ``model`` (trunk + heads, with or without batch statistics): gradients of
    ``sum_k w_k L_k + R(S)`` where ``S_k = dL_k/dz`` are the task saliencies and R the TSR + CSA
    regulariser (double backprop through S), ``w`` the loss-weighting method's weights. One VJP of
    ``(losses, R)`` w.r.t. (head params, z) with cotangent ``(w, 1)`` and one through the trunk, on
    ``make_stateful_representation_forward``'s pair."""
    return _stateful_gradients(method, rep_cfg, *make_stateful_representation_forward(model, tasks, input_key,
                                                                                      precision))
