"""Sharpness-aware steps: SAM / ASAM on the method's objective, and task-based flat minima (F-MTL).

SAM (Foret et al., ICLR 2021, Eq. 2): ``eps = rho * g / ||g||``; the update uses the gradient at
``w + eps``. ASAM (Kwon et al., ICML 2021, Eq. 8): ``eps = rho * T^2 g / ||T g||`` with
``T = |w| + eta``.

F-MTL (Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions", Alg. 1):
every task k perturbs the shared weights and its own head by ``eps_k`` computed from its own
gradient ``g_k``; the perturbed gradients ``g~_k = grad L_k(w + eps_k)`` (all K in one vmapped
computation) give the flat directions ``h_k = g~_k - g_k``, and the shared update is
``A(g_1..g_K) + A(h_1..h_K)`` for the configured aggregator A (the ``fmtl_a`` variant uses
``A(g~_1..g~_K)``). Head k is updated with ``g~_k``. Batch-norm statistics from the perturbed
passes are discarded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("", "sam", "fmtl", "fmtl_a")


def perturbation(grads, params, rho: float, adaptive: bool, eta: float):
    """``eps = rho * T^2 g / ||T g||`` (T = |w| + eta if adaptive else 1) over a whole tree."""
    if adaptive:
        scale = jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)) + eta, params)
    else:
        scale = jax.tree.map(lambda w: jnp.ones((), jnp.float32), params)
    scaled = jax.tree.map(lambda t, g: t * g, scale, grads)
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(scaled)))
    factor = rho / jnp.maximum(norm, 1e-12)
    return jax.tree.map(lambda t, g: factor * t * t * g, scale, grads)


def add(params, eps):
    return jax.tree.map(lambda w, e: (w + e).astype(w.dtype), params, eps)


def task_perturbations(jacobian, params, rho: float, adaptive: bool, eta: float):
    """Per-task ``eps_k`` from the rows ``g_k`` of a stacked gradient tree (leaves [K, ...]).

    Row k of the head part is zero outside head k, so ``eps_k`` moves only the shared weights
    and head k.
    """
    return jax.vmap(lambda g: perturbation(g, params, rho, adaptive, eta))(jacobian)


def perturbed_task_gradients(losses_fn, params, task_eps):
    """``g~_k = grad_w L_k(w + eps_k)`` for all k at once: leaves [K, ...].

    ``losses_fn(params) -> [K]``; ``task_eps`` leaves [K, ...] (from ``task_perturbations``).
    """
    num_tasks = jax.tree.leaves(task_eps)[0].shape[0]

    def one(eps, onehot):
        _, vjp_fn = jax.vjp(losses_fn, add(params, eps))
        return vjp_fn(onehot)[0]

    return jax.vmap(one)(task_eps, jnp.eye(num_tasks, dtype=jnp.float32))
