"""Rep-MTL as a gradient strategy: the loss-weighting method's ``sum_k w_k L_k`` plus the
saliency regularisers of ``train/rep_mtl.py``, differentiated through the representation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.train import rep_mtl
from mtl_jax.train.gradients.base import StepContext, Strategy, TaskGradients
from mtl_jax.train.methods import MethodInputs


def rep_mtl_gradients(method, rep_cfg, encode, decode) -> Strategy:
    """Rep-MTL: gradients of ``sum_k w_k L_k + R(S)`` where ``S_k = dL_k/dz`` are the task saliencies
    and R the TSR + CSA regulariser (double backprop through S).

    One VJP of ``(losses, R)`` w.r.t. (head params, z) with cotangent ``(w, 1)`` and one through the
    trunk. Models without mutable state (``model_state`` passes through).
    """

    def gradients(ctx: StepContext) -> TaskGradients:
        enc_key, dec_key = jax.random.split(ctx.key)
        z, encode_vjp = jax.vjp(lambda p: encode(p, ctx.batch, enc_key, True), ctx.params["shared"])

        def objective(head_params, zz):
            reg, aux = rep_mtl.rep_mtl_loss(lambda z_: decode(head_params, z_, ctx.batch, dec_key, True), zz,
                                            has_aux=True, tsr_weight=rep_cfg.tsr_weight,
                                            csa_weight=rep_cfg.csa_weight, temperature=rep_cfg.temperature)
            return (aux["losses"], reg), aux["decode_aux"]

        (losses, _), objective_vjp, preds = jax.vjp(objective, ctx.params["heads"], z, has_aux=True)
        weights, method_state = method.update(MethodInputs(losses=losses, step=ctx.step), ctx.method_state,
                                              ctx.method_key)
        weights = jax.lax.stop_gradient(weights).astype(losses.dtype)
        head_grads, z_cotangent = objective_vjp((weights, jnp.ones((), losses.dtype)))
        (shared,) = encode_vjp(z_cotangent)
        return TaskGradients({"shared": shared, "heads": head_grads}, weights, method_state, losses, preds,
                             ctx.model_state)

    return gradients
