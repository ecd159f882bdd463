"""Per-task gradients from a VJP / JVP of the losses: the stacked Jacobian rows, and Gramian
columns ``J (J^T e_l)`` without the Jacobian."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def map_cotangents(fn, cotangents, chunk: int = 0):
    """``fn`` over the leading axis of ``cotangents``: one vmap, or ``chunk`` at a time (``lax.map``)."""
    return jax.lax.map(fn, cotangents, batch_size=chunk) if chunk else jax.vmap(fn)(cotangents)


def per_task_jacobian(vjp_fn, num_tasks: int, dtype=jnp.float32, chunk: int = 0):
    """Per-task gradients from one vmapped VJP: leaves [K, ...] (a tuple if ``vjp_fn`` has several
    primals). ``chunk > 0`` evaluates ``chunk`` tasks at a time (``lax.map``) to bound memory.

    Row k of the head part is non-zero only for head k.
    """
    jac = map_cotangents(vjp_fn, jnp.eye(num_tasks, dtype=dtype), chunk)
    return jac[0] if len(jac) == 1 else jac


def linearize(fn, primal, has_aux: bool = False):
    """``(out, vjp_fn, jvp_fn[, aux])`` of ``fn`` at ``primal`` from one linearisation: the VJP is
    the transpose of the JVP (as in ``jax.vjp``), so one forward pass serves both."""
    out, jvp_fn, *aux = jax.linearize(fn, primal, has_aux=has_aux)
    return (out, jax.linear_transpose(jvp_fn, primal), jvp_fn, *aux)


def gramian_by_jvp(vjp_fn, jvp_fn, cotangents, chunk: int = 0) -> jax.Array:
    """Gramian columns without the Jacobian: row l of the result is ``jvp_fn(vjp_fn(c_l))``.

    With ``vjp_fn(c) = J^T c`` (a parameter tangent) and ``jvp_fn(t) = J t`` [K], the cotangents
    ``c_l = e_l`` ([C, K], C = K) give ``J J^T e_l``, column l of ``G``: one VJP + one JVP per
    column, ``chunk`` columns at a time (memory chunk x P, never K x P). Returns [C, K].
    """
    return map_cotangents(lambda c: jvp_fn(vjp_fn(c)), cotangents, chunk)


def params_gramian_by_jvp(vjp_fn, jvp_fn, params, num_tasks: int, dtype, chunk: int = 0) -> jax.Array:
    """[K, K] Gramian of the per-task *shared* gradients from the full-parameter ``vjp_fn`` /
    ``jvp_fn`` (``linearize`` of the losses): the tangent is ``J_shared^T e_l`` with zero heads."""
    zero_heads = jax.tree.map(jnp.zeros_like, params["heads"])
    to_tangent = lambda c: {"shared": vjp_fn(c)[0]["shared"], "heads": zero_heads}
    columns = gramian_by_jvp(to_tangent, jvp_fn, jnp.eye(num_tasks, dtype=dtype), chunk)
    return (0.5 * (columns + columns.T)).astype(jnp.float32)

