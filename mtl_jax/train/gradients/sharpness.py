"""Flat-minima strategies: SAM / ASAM as a wrapper around any gradient strategy, and F-MTL's
task-based flat minima (the maths in ``train/flat_minima.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.train import flat_minima
from mtl_jax.train.gradients.base import StepContext, Strategy, TaskGradients
from mtl_jax.train.gradients.combine import aggregate, head_gradients
from mtl_jax.train.gradients.jacobian import per_task_jacobian


def sam(gradients: Strategy, sharpness) -> Strategy:
    """SAM (Foret et al. 2021) / ASAM (Kwon et al. 2021) on the method's objective: the strategy's
    gradient ``d`` at ``w``, ``eps = rho d / ||d||`` (ASAM: ``T^2 d / ||T d||``, ``T = |w| + eta``),
    then the same strategy at ``w + eps`` with the same batch, keys and method state. The reported
    losses, predictions and batch statistics are the unperturbed pass's."""

    def perturbed(ctx: StepContext) -> TaskGradients:
        at_w = gradients(ctx)
        eps = flat_minima.perturbation(at_w.grads, ctx.params, sharpness.rho, sharpness.adaptive, sharpness.eta)
        at_w_eps = gradients(ctx._replace(params=flat_minima.add(ctx.params, eps)))
        return at_w_eps._replace(losses=at_w.losses, predictions=at_w.predictions, model_state=at_w.model_state)

    return perturbed


def fmtl(method, sharpness, forward, linearize, split_of, last_shared=None) -> Strategy:
    """F-MTL (Phan et al. 2022; see flat_minima.py): per-task perturbations ``eps_k`` from the task
    gradients ``g_k``, ``g~_k`` at ``w + eps_k``; the shared gradient is ``A(g) + A(g~ - g)`` ('fmtl')
    or ``A(g~)`` ('fmtl_a'), head k gets ``g~_k``. ``linearize`` / ``split_of``: the parameter-level
    forward (``gradients.params``); ``last_shared``: GradNorm's layer selector, read from J's rows."""

    def gradients(ctx: StepContext) -> TaskGradients:
        lin = linearize(ctx.params, ctx.model_state, ctx.batch, ctx.key, split_of(ctx.params, ctx.model_state,
                                                                                  ctx.batch))
        losses_fn = lambda p: forward(p, ctx.model_state, ctx.batch, ctx.key, True)[0]
        grads, weights, method_state = flat_task_gradients(method, sharpness, losses_fn, ctx.params, lin.losses,
                                                           lin.vjp_fn, ctx.method_state, ctx.step, ctx.method_key,
                                                           last_shared)
        return TaskGradients(grads, weights, method_state, lin.losses, lin.predictions, lin.model_state)

    return gradients


def flat_task_gradients(method, sharpness, losses_fn, params, losses, vjp_fn, method_state, step, key,
                        last_shared=None):
    """F-MTL's ``(grads, weights, method_state)``: shared ``A(g) + A(h)`` (or ``A(g~)`` for 'fmtl_a'),
    heads ``g~_k``."""
    jac = per_task_jacobian(vjp_fn, losses.shape[0], losses.dtype)
    task_eps = flat_minima.task_perturbations(jac, params, sharpness.rho, sharpness.adaptive, sharpness.eta)
    perturbed = flat_minima.perturbed_task_gradients(losses_fn, params, task_eps)
    key_g, key_h = jax.random.split(key)
    if sharpness.kind == "fmtl_a":
        shared, weights, new_state = aggregate(method, losses, perturbed["shared"], method_state, step, key_g,
                                               last_shared)
    else:
        shared, weights, new_state = aggregate(method, losses, jac["shared"], method_state, step, key_g, last_shared)
        flat = jax.tree.map(jnp.subtract, perturbed["shared"], jac["shared"])
        shared_flat, _, _ = aggregate(method, losses, flat, method_state, step, key_h, last_shared)
        shared = jax.tree.map(jnp.add, shared, shared_flat)
    heads = head_gradients(method, weights, perturbed["heads"], new_state)
    return {"shared": shared, "heads": heads}, weights, new_state
