"""Methods whose update is not a linear combination of the current task gradients.

They need the flattened per-task Jacobian ``J [K, P]`` (``needs=Needs.JACOBIAN``) and return the
shared-parameter *direction* ``d [P]`` (``weights_heads=False``; ``base.returns_direction``);
the trainer unflattens ``d`` like a row of ``J``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.counter_random import counter_uniform
from mtl_jax.train.methods.base import (EmptyState, Method, MethodInputs, Needs, check_num_tasks, need_num_params,
                                        require)

_EPS = 1e-8


def _task_sum(rows: jax.Array) -> jax.Array:
    """``rows [K, P]`` summed over K as K - 1 adds, which XLA fuses into one pass. On XLA:CPU (2
    cores, P = 670k) ``rows.sum(0)`` took ~50x as long and ``ones @ rows`` ~3x (K = 2, 10)."""
    total = rows[0]
    for row in range(1, rows.shape[0]):
        total = total + rows[row]
    return total


def make_graddrop(num_tasks: int | None = None, leak: float = 0.0) -> Method:
    """GradDrop (Chen et al., NeurIPS 2020, Eqs. 1-3 / Alg. 1; LibMTL default leak = 0).

    Per coordinate p: positive-sign purity ``P = (1 + sum_k g_kp / sum_k |g_kp|) / 2``, ``U ~ U(0, 1)``;
    task k keeps ``g_kp`` if ``(P > U and g_kp > 0)`` or ``(P < U and g_kp < 0)``, else it is scaled
    by ``leak``; ``d = sum_k g_k * (leak + (1 - leak) mask_k)``. ``U`` comes from
    ``counter_random.counter_uniform`` (a hash of the step key and the coordinate). The paper applies it to gradients
    at a shared activation (sign-corrected by the input, summed over the batch); here it applies to
    whatever rows the trainer passes as ``jacobian`` (shared-parameter gradients by default).
    """
    check_num_tasks("graddrop", num_tasks)

    def init(num_tasks: int):
        check_num_tasks("graddrop", num_tasks)
        return EmptyState()

    def update(inputs: MethodInputs, state, key):
        jacobian = require(inputs, "jacobian", "graddrop")
        purity = 0.5 * (1.0 + _task_sum(jacobian) / (_task_sum(jnp.abs(jacobian)) + 1e-7))
        uniform = counter_uniform(key, purity.shape, purity.dtype)  # threefry: ~5.6 ms per 670k draws on 2 cores
        keep = ((purity > uniform)[None] & (jacobian > 0)) | ((purity < uniform)[None] & (jacobian < 0))
        mask = leak + (1.0 - leak) * keep.astype(jacobian.dtype)
        return _task_sum(jacobian * mask), state

    return Method("graddrop", init, update, Needs.JACOBIAN, False)


class MoCoState(NamedTuple):
    """MoCo: the tracked gradients ``tracked`` [K, P] (``Y``), the task ``weights`` [K] (``lambda``)
    and the update count ``count`` (t - 1)."""

    tracked: jax.Array
    weights: jax.Array
    count: jax.Array


def make_moco(
    num_params: int | None = None,
    num_tasks: int | None = None,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> Method:
    """MoCo (Fernando et al., ICLR 2023, Alg. 1 / Eqs. 4-5; LibMTL defaults).

    Tracked gradients ``Y [K, P]``: ``Y <- Y - beta_t (Y - Gt)`` with ``Gt_k = L_k g_k / ||g_k||``
    (LibMTL's normalisation) and ``beta_t = beta / t^beta_sigma``; weights
    ``lambda <- softmax(lambda - gamma_t (Y Y^T + rho I) lambda)``, ``gamma_t = gamma / t^gamma_sigma``
    (t = 1, 2, ...); direction ``d = Y^T lambda``. Per-parameter state: ``init(num_tasks,
    num_params=P)`` sizes ``Y`` (``num_params`` given here is the default; the trainer binds the
    model's P).

    State: ``MoCoState(tracked [K, P], weights [K], count)``.
    """
    check_num_tasks("moco", num_tasks)
    default_num_params = num_params

    def init(num_tasks: int, num_params: int | None = None):
        check_num_tasks("moco", num_tasks)
        num_params = need_num_params("moco", default_num_params if num_params is None else num_params)
        return MoCoState(jnp.zeros((num_tasks, num_params), jnp.float32),
                         jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32), jnp.zeros((), jnp.int32))

    def update(inputs: MethodInputs, state, key):
        del key
        jacobian = require(inputs, "jacobian", "moco").astype(jnp.float32)
        count = state.count + 1
        t = count.astype(jnp.float32)
        norms = jnp.linalg.norm(jacobian, axis=1, keepdims=True)
        target = jacobian / (norms + _EPS) * inputs.losses[:, None]
        tracked = state.tracked - beta / t**beta_sigma * (state.tracked - target)
        lam = state.weights
        lam = jax.nn.softmax(lam - gamma / t**gamma_sigma * (tracked @ (tracked.T @ lam) + rho * lam))
        return tracked.T @ lam, MoCoState(tracked, lam, count)

    return Method("moco", init, update, Needs.JACOBIAN, False, per_parameter_state=True)
