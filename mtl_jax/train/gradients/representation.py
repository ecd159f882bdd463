"""Per-task gradients through the shared representation ``z`` of a trunk + heads model: every
head differentiated once (``heads_once``), the trunk by one VJP per cotangent; and the
representation-level strategy (MGDA-UB: the method applied to ``Z_k = dL_k/dz``)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from mtl_jax.errors import UsageError
from mtl_jax.train.gradients import layerwise as layerwise_gramian
from mtl_jax.train.gradients.base import Linearization, StepContext, TaskGradients
from mtl_jax.train.gradients.combine import aggregate, head_weights
from mtl_jax.train.gradients.jacobian import linearize
from mtl_jax.train.precision import FLOAT32, Precision, cast_params


def one_layer_heads(head_params) -> bool:
    """Whether every head's parameters are one Dense layer's (a ``kernel`` [D, C], optionally a ``bias``)."""
    for params in head_params.values():
        flat = traverse_util.flatten_dict(params)
        kernels = [path for path in flat if path[-1] == "kernel"]
        if len(kernels) != 1 or jnp.ndim(flat[kernels[0]]) != 2:
            return False
        if any(path[:-1] != kernels[0][:-1] or path[-1] not in ("kernel", "bias") for path in flat):
            return False
    return True


def heads_once(decode, head_params, z, batch, key, names: Sequence[str]):
    """``(losses [K], predictions, head_rows, Z)`` with every head differentiated once.

    ``decode``: a ``forward.Decode``. Head t reads its own copy z_t of the representation ``z``, so one
    VJP with cotangent ones gives ``head_rows = {t: d L_t / d head_t}`` and ``Z_t = d L_t / dz``
    stacked as ``Z`` (leaves [K, ...z]); exact, since L_t depends on head t only. A vmapped VJP with
    one-hot cotangents would send each ``e_k`` back through all K heads (K^2 head backward passes).

    One-layer heads (``one_layer_heads``) run on the one ``z`` instead: the losses' VJP gives each
    head's output cotangent ``dL_t / dy_t``, ``head_rows`` is the heads' VJP with them (the kernels'
    gradients read z once: one GEMM [D, B] x [B, K C] for stacked heads, not K products with the copies),
    and ``Z_t = (dL_t / dy_t) W_t^T`` the VJP of the heads on the copies with the same cotangents (no
    forward on the copies: a linear layer's input cotangent does not read its input).
    """
    copies = {t: z for t in names}
    if not one_layer_heads(head_params):
        losses, decode_vjp, preds = jax.vjp(lambda hp, zs: decode(hp, zs, batch, key, True, per_task=True),
                                            head_params, copies, has_aux=True)
        head_rows, z_rows = decode_vjp(jnp.ones_like(losses))
    else:
        preds, heads_vjp = jax.vjp(lambda hp: decode.heads(hp, z, key, True), head_params)
        losses, losses_vjp = jax.vjp(lambda p: decode.losses(p, batch), preds)
        (pred_cotangents,) = losses_vjp(jnp.ones_like(losses))
        (head_rows,) = heads_vjp(pred_cotangents)
        _, copies_vjp = jax.vjp(lambda zs: decode.heads(head_params, zs, key, True, per_task=True), copies)
        (z_rows,) = copies_vjp(pred_cotangents)
    stacked_z = jax.tree.map(lambda *rows: jnp.stack(rows), *[z_rows[t] for t in names])
    return losses, preds, head_rows, stacked_z


def scale_head_rows(head_rows, weights, names: Sequence[str]):
    """``{t: w_t d L_t / d head_t}``: the heads' part of ``J^T w`` from ``heads_once``'s rows."""
    return {t: jax.tree.map(lambda g, k=k: (weights[k] * g).astype(g.dtype), head_rows[t])
            for k, t in enumerate(names)}


def representation_losses_and_vjp(encode, decode, params, batch, key, names: Sequence[str], with_jvp: bool = False,
                                  layerwise: bool = False, chunk: int = 0, precision: Precision = FLOAT32) -> Linearization:
    """The ``Linearization`` (losses [K], vjp_fn, jvp_fn, layer_rows, predictions) equal to ``jax.vjp``
    (and ``jax.jvp``) of the whole training forward w.r.t. ``params``, with the heads differentiated
    once instead of once per task; ``model_state`` is None (models without mutable state).

    A vmapped VJP of the whole forward sends each cotangent ``e_k`` back through all K heads (K^2
    head backward passes for a Jacobian). Here ``heads_once`` gives every head's own gradient
    ``d L_t / d head_t`` and ``Z_t = d L_t / dz`` [K, B, ...] from one VJP; then ``vjp_fn(c)`` is
    ``{'shared': trunk VJP of sum_t c_t Z_t, 'heads': {t: c_t d L_t / d head_t}}`` (exact: L_t
    depends on head t only), one trunk backward per cotangent. Memory: Z, K x the representation.

    ``with_jvp``: the trunk is linearised instead (one forward for both directions) and
    ``jvp_fn(tangent) [K] = <Z_t, J_z tangent['shared']> + <d L_t / d head_t, tangent['heads'][t]>``,
    one trunk JVP per tangent, no head pass: a Gramian column ``J (J^T e_l)``
    (``gramian_mode='vjp_jvp'``) is then one trunk VJP + one trunk JVP. ``layerwise``: ``layer_rows``
    are the ``layerwise.LayerRows`` of the shared rows (the trunk's Dense inputs and the per-task
    cotangents ``Z_t`` sent back through the trunk, ``chunk`` tasks at a time), whose
    ``layerwise_gramian`` is G. ``precision``: the policy ``encode`` casts with (the layer-wise
    pieces are read from the cast trunk parameters).
    """
    trunk = lambda p: encode(p, batch, key, True)
    if layerwise:
        cast_shared = lambda p: cast_params(precision, {"shared": p})["shared"]
        z, encode_vjp, trunk_rows = layerwise_gramian.vjp_and_layerwise_gramian(trunk, params["shared"],
                                                                                prepare=cast_shared)
    elif with_jvp:
        z, encode_vjp, encode_jvp = linearize(trunk, params["shared"])
    else:
        z, encode_vjp = jax.vjp(trunk, params["shared"])
    losses, preds, head_rows, stacked_z = heads_once(decode, params["heads"], z, batch, key, names)

    def vjp_fn(cotangent):
        z_cotangent = jax.tree.map(lambda zs: jnp.tensordot(cotangent.astype(zs.dtype), zs, axes=1), stacked_z)
        (shared,) = encode_vjp(z_cotangent)
        return ({"shared": shared, "heads": scale_head_rows(head_rows, cotangent, names)},)

    def jvp_fn(tangent):
        dz = encode_jvp(tangent["shared"])
        through_trunk = sum(jnp.tensordot(zs, d, axes=d.ndim).astype(losses.dtype)
                            for zs, d in zip(jax.tree.leaves(stacked_z), jax.tree.leaves(dz)))
        through_heads = jnp.stack([sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(head_rows[t]),
                                                                       jax.tree.leaves(tangent["heads"][t])))
                                   for t in names]).astype(losses.dtype)
        return through_trunk + through_heads

    rows = trunk_rows(stacked_z, chunk) if layerwise else None
    return Linearization(losses, vjp_fn, jvp_fn if with_jvp else None, rows, preds, None)


def representation_level(method, encode, decode, names: Sequence[str], sows_aux_loss=lambda params, batch: False):
    """The strategy with the method applied to ``Z_k = dL_k/dz`` (MGDA-UB, Sener & Koltun 2018, Thm. 1;
    LibMTL's ``rep_grad``).

    One backward pass through the heads, each differentiated once (``heads_once``), gives ``Z``
    [K, B, ...]; the method's weights (or direction) form one cotangent for z, and one backward
    pass through the trunk gives the shared gradient. GradNorm (``wants`` the last shared layer's
    Gramian) gets ``Z Z^T``: its norms are those of the representation gradients, as in LibMTL
    with ``rep_grad=True``. Models without mutable state and without auxiliary losses
    (``sows_aux_loss(params, batch)``, e.g. ``forward.sows_aux_loss``: the heads' decode drops them):
    a one-line UsageError otherwise.
    """

    def gradients(ctx: StepContext) -> TaskGradients:
        if jax.tree.leaves(ctx.model_state):
            raise UsageError(f"jacobian.level='representation' needs a model without mutable state; this one has "
                             f"{sorted(ctx.model_state)} (batch statistics): use jacobian.level='params'")
        if sows_aux_loss(ctx.params, ctx.batch):
            raise UsageError("jacobian.level='representation' would drop the auxiliary losses this model sows (MoE "
                             "balancing, AiT's token loss): use jacobian.level='params'")
        enc_key, dec_key = jax.random.split(ctx.key)
        z, encode_vjp = jax.vjp(lambda p: encode(p, ctx.batch, enc_key, True), ctx.params["shared"])
        losses, preds, head_rows, stacked_z = heads_once(decode, ctx.params["heads"], z, ctx.batch, dec_key, names)
        z_cotangent, weights, method_state = aggregate(method, losses, stacked_z, ctx.method_state, ctx.step,
                                                       ctx.method_key)
        (shared,) = encode_vjp(z_cotangent)
        heads = scale_head_rows(head_rows, head_weights(method, weights, method_state), names)
        return TaskGradients({"shared": shared, "heads": heads}, weights, method_state, losses, preds,
                             ctx.model_state)

    return gradients
