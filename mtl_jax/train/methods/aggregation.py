"""Gradient-aggregation methods computed from the K x K Gramian ``G = J J^T`` alone.

Each returns weights ``w [K]`` such that the shared update is ``J^T w = sum_k w_k g_k``; every
method here is a linear combination of the task gradients, so the coefficients follow from inner
products only. ``weights_heads=False``: head k is trained on ``L_k``. All need ``K >= 2``
(checked at construction when ``num_tasks`` is given, and in ``init``).

MGDA-UB (Sener & Koltun 2018, Sec. 3.3) is ``mgda`` fed with the Gramian of the gradients w.r.t.
the shared *representation* (summed over the batch) instead of the shared parameters.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.train.methods import solvers
from mtl_jax.train.methods.base import (EmptyState, Method, MethodInputs, Needs, check_num_tasks, normalized_gramian,
                                        require)

_EPS = 1e-8


def _gramian_method(
    name: str, num_tasks: int | None, update: Callable, init: Callable | None = None, needs: Needs = Needs.GRAMIAN,
    wants: tuple[str, ...] = (),
) -> Method:
    """Wraps ``update`` with the K >= 2 checks and the Gramian lookup."""
    check_num_tasks(name, num_tasks)

    def checked_init(num_tasks: int):
        check_num_tasks(name, num_tasks)
        return EmptyState() if init is None else init(num_tasks)

    return Method(name, checked_init, update, needs, False, wants=wants)


def _inv_norms(gramian: jax.Array) -> jax.Array:
    """``1 / ||g_k||`` from the diagonal, 0 for a zero gradient. [K]"""
    sq = jnp.diagonal(gramian)
    return jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


# ------------------------------------------------------------------------------------------ MGDA


def make_mgda(num_tasks: int | None = None, normalization: str = "none", num_iters: int | None = None) -> Method:
    """MGDA (Desideri 2012; Sener & Koltun, NeurIPS 2018, Eq. 3 / Alg. 2).

    ``w = argmin_{w in simplex} ||sum_k w_k g_k / n_k||^2`` (weights sum to 1), returned for the raw
    gradients as ``w_k / n_k``. ``normalization`` (LibMTL's ``mgda_gn``, default 'none'): ``n_k`` =
    1 ('none'), ``||g_k||`` ('l2'), ``L_k`` ('loss'), ``L_k ||g_k||`` ('loss+'). Solved by
    ``solvers.min_norm_on_simplex`` (exact active set; ``num_iters`` caps its iterations, None: 4K + 8).
    """
    if normalization not in ("none", "l2", "loss", "loss+"):
        raise ValueError(f"mgda normalization must be one of none, l2, loss, loss+; got {normalization!r}")

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "mgda")
        inv_norm = _inv_norms(gramian)
        inv_loss = 1.0 / jnp.maximum(inputs.losses, _EPS)
        scale = {"none": jnp.ones_like(inv_norm), "l2": inv_norm, "loss": inv_loss, "loss+": inv_loss * inv_norm}[
            normalization
        ]
        scaled = gramian * scale[:, None] * scale[None, :]
        gramian_n, _ = normalized_gramian(scaled, reg=0.0)
        w = solvers.min_norm_on_simplex(gramian_n, num_iters)
        return w * scale, state

    return _gramian_method("mgda", num_tasks, update)


# --------------------------------------------------------------------------- PCGrad and GradVac


def _random_orders(key: jax.Array, num: int) -> jax.Array:
    """[K, K] row i: a random permutation of the tasks (the order task i visits the others)."""
    return jax.vmap(lambda k: jax.random.permutation(k, num))(jax.random.split(key, num))


def make_pcgrad(num_tasks: int | None = None) -> Method:
    """PCGrad (Yu et al., NeurIPS 2020, Alg. 1 / Eq. in Sec. 3.2), in coefficient form.

    Each task i starts from ``g_i^PC = g_i`` and visits the other tasks j in a random order; if
    ``g_i^PC . g_j < 0`` it removes the conflicting component, ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``.
    Writing ``g_i^PC = J^T c_i`` every inner product is ``(G c_i)_j``, so the projections run on the
    coefficients (``lax.fori_loop`` over the visit order, ``vmap`` over i). The update is
    ``sum_i g_i^PC`` (the paper's sum), i.e. ``w = sum_i c_i``.
    """

    def update(inputs: MethodInputs, state, key):
        gramian = require(inputs, "gramian", "pcgrad")
        num = gramian.shape[0]
        sq_norms = jnp.diagonal(gramian)
        orders = _random_orders(key, num)

        def project_task(i, order):
            def visit(position, coef):
                j = order[position]
                dot = gramian[j] @ coef
                conflict = (dot < 0) & (j != i) & (sq_norms[j] > 0)
                step = jnp.where(conflict, dot / jnp.where(sq_norms[j] > 0, sq_norms[j], 1.0), 0.0)
                return coef.at[j].add(-step)

            return jax.lax.fori_loop(0, num, visit, jax.nn.one_hot(i, num, dtype=gramian.dtype))

        coefs = jax.vmap(project_task)(jnp.arange(num), orders)
        return coefs.sum(axis=0), state

    return _gramian_method("pcgrad", num_tasks, update)


class GradVacState(NamedTuple):
    """GradVac: the EMA targets ``target_cos`` [K, K] of the pairwise gradient cosines."""

    target_cos: jax.Array


def make_gradvac(num_tasks: int | None = None, beta: float = 0.5) -> Method:
    """Gradient Vaccine (Wang et al., ICLR 2021, Alg. 1 / Eq. 5), whole-model granularity.

    For each task i and the others j in random order, with ``phi_ij`` the cosine between the
    current ``g_i^GV`` and ``g_j`` and ``phihat_ij`` its EMA target: if ``phi_ij < phihat_ij``,
    ``g_i^GV += ||g_i^GV|| (phihat sqrt(1 - phi^2) - phi sqrt(1 - phihat^2)) /
    (||g_j|| sqrt(1 - phihat^2)) g_j``; then ``phihat_ij <- (1 - beta) phihat_ij + beta phi_ij``
    (EMA updated every visit, as in the paper's Alg. 1; LibMTL updates it only on a conflict).
    Runs on coefficients like PCGrad; update ``sum_i g_i^GV``. beta = 0.5 (LibMTL default).

    State: ``GradVacState(target_cos [K, K])`` (init 0, so the first steps act like PCGrad).
    """

    def init(num_tasks: int):
        return GradVacState(jnp.zeros((num_tasks, num_tasks), jnp.float32))

    def update(inputs: MethodInputs, state, key):
        gramian = require(inputs, "gramian", "gradvac")
        num = gramian.shape[0]
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
        orders = _random_orders(key, num)

        def vaccinate_task(i, order, targets):
            def visit(position, carry):
                coef, targets = carry
                j = order[position]
                norm_i = jnp.sqrt(jnp.maximum(coef @ gramian @ coef, 0.0))
                cos = (gramian[j] @ coef) / (norm_i * norms[j] + _EPS)
                target = targets[j]
                boost = norm_i * (
                    target * jnp.sqrt(jnp.maximum(1 - cos**2, 0.0)) - cos * jnp.sqrt(jnp.maximum(1 - target**2, 0.0))
                )
                boost = boost / (norms[j] * jnp.sqrt(jnp.maximum(1 - target**2, 0.0)) + _EPS)
                is_other = j != i
                coef = coef.at[j].add(jnp.where(is_other & (cos < target), boost, 0.0))
                targets = targets.at[j].set(jnp.where(is_other, (1 - beta) * target + beta * cos, target))
                return coef, targets

            start = (jax.nn.one_hot(i, num, dtype=gramian.dtype), targets)
            return jax.lax.fori_loop(0, num, visit, start)

        coefs, targets = jax.vmap(vaccinate_task)(jnp.arange(num), orders, state.target_cos)
        return coefs.sum(axis=0), GradVacState(targets)

    return _gramian_method("gradvac", num_tasks, update, init)


# -------------------------------------------------------------------------------------- CAGrad


def make_cagrad(num_tasks: int | None = None, c: float = 0.5, rescale: int = 1, num_iters: int | None = None) -> Method:
    """CAGrad (Liu et al., NeurIPS 2021, Eq. 5-6 / Alg. 1; official defaults c=0.5, rescale=1).

    Dual: ``w = argmin_{w in simplex} g_w^T g_0 + sqrt(phi) ||g_w||`` with ``g_0`` the mean
    gradient, ``g_w = J^T w``, ``sqrt(phi) = c ||g_0||``; update ``g_0 + (sqrt(phi) / ||g_w||) g_w``,
    divided by ``1 + c^2`` (rescale=1), ``1 + c`` (2) or 1 (0). ``c = 0`` gives the mean gradient.
    The dual is solved by ``solvers.cagrad_dual`` (exact active set; ``num_iters`` caps its iterations).
    """
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad rescale must be 0, 1 or 2; got {rescale}")
    divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "cagrad")
        num = gramian.shape[0]
        gramian_n, _ = normalized_gramian(gramian, reg=0.0)
        mean_w = jnp.full((num,), 1.0 / num, gramian.dtype)
        g0_norm = jnp.sqrt(jnp.maximum(mean_w @ gramian_n @ mean_w, 0.0) + _EPS)
        radius = c * g0_norm

        w = solvers.cagrad_dual(gramian_n, gramian_n @ mean_w, radius, _EPS, num_iters)
        gw_norm = jnp.sqrt(jnp.maximum(w @ gramian_n @ w, 0.0))
        lam = radius / (gw_norm + _EPS)
        return (mean_w + lam * w) / divisor, state

    return _gramian_method("cagrad", num_tasks, update)


# ------------------------------------------------------------------------ Nash-MTL and FairGrad


def _fair_weights(gramian: jax.Array, alpha: float, reg: float, num_iters: int) -> jax.Array:
    """Solution of ``G w = w^(-1/alpha)`` for the raw Gramian (solved on the normalised one).

    The ridge is relative to each task's own squared norm, ``reg * diag(max(G_kk, 1e-2))`` on the
    unit-mean-diagonal Gramian: a ridge ``reg * I`` would break Nash-MTL's invariance to loss
    scales and pull its fixed points on an antiparallel front to where the gradient norms are equal.
    """
    gramian_n, scale = normalized_gramian(gramian, 0.0)
    gramian_n = gramian_n + reg * jnp.diag(jnp.maximum(jnp.diagonal(gramian_n), 1e-2))
    w = solvers.solve_power_bargaining(gramian_n, alpha, num_iters)
    # G = s Gn and Gn w = w^(-1/alpha)  =>  G (c w) = (c w)^(-1/alpha) for c = s^(-alpha/(alpha+1)).
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    return w * safe_scale ** (-alpha / (alpha + 1.0))


class NashMTLState(NamedTuple):
    """Nash-MTL: the last computed bargaining ``weights`` [K] (before the norm clip)."""

    weights: jax.Array


def make_nash_mtl(
    num_tasks: int | None = None,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    reg: float = 1e-4,
    num_iters: int = 30,
) -> Method:
    """Nash-MTL (Navon et al., ICML 2022, Eq. 3 / Claim 3.1 / Alg. 1; official defaults).

    The Nash bargaining solution ``alpha > 0`` with ``G alpha = 1 / alpha`` (on the raw Gramian),
    solved on device by ``solvers.solve_power_bargaining`` (Newton, ``num_iters``) on the Gramian
    normalised to unit mean diagonal plus the task-relative ridge ``reg * diag(G)`` (scale invariant). As in the official code, the weights are
    recomputed every ``update_weights_every`` steps (state keeps the last ones) and the shared
    update is clipped to norm ``max_norm`` (``<= 0`` disables): the clip is folded into the
    weights since ``||J^T alpha|| = sqrt(alpha^T G alpha)``. State: ``NashMTLState(weights [K])``.
    """

    def init(num_tasks: int):
        return NashMTLState(jnp.ones((num_tasks,), jnp.float32))

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "nash_mtl")
        fresh = _fair_weights(gramian, 1.0, reg, num_iters)
        refresh = (inputs.step % update_weights_every) == 0
        weights = jnp.where(refresh, fresh, state.weights)
        out = weights
        if max_norm > 0:
            norm = jnp.sqrt(jnp.maximum(weights @ gramian @ weights, 0.0))
            out = weights * jnp.minimum(1.0, max_norm / (norm + 1e-12))
        return out, NashMTLState(weights)

    return _gramian_method("nash_mtl", num_tasks, update, init)


def make_fairgrad(num_tasks: int | None = None, alpha: float = 1.0, reg: float = 1e-4, num_iters: int = 30) -> Method:
    """FairGrad (Ban & Ji, ICML 2024, Eq. 7; LibMTL default alpha = 1).

    alpha-fair allocation: ``w > 0`` with ``G w = w^(-1/alpha)``; alpha = 1 is proportional
    fairness (Nash-MTL without the clip), alpha -> inf approaches max-min fairness. Solved by
    ``solvers.solve_power_bargaining`` (the official code uses scipy ``least_squares``).
    """
    if alpha <= 0:
        raise ValueError(f"fairgrad alpha must be > 0, got {alpha}")

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "fairgrad")
        return _fair_weights(gramian, float(alpha), reg, num_iters), state

    return _gramian_method("fairgrad", num_tasks, update)


# ----------------------------------------------------------------------- IMTL-G and Aligned-MTL


def make_imtl_g(num_tasks: int | None = None) -> Method:
    """IMTL-G (Liu et al., ICLR 2021, Eq. 9), in TorchJD's pseudo-inverse form.

    Weights ``w`` summing to 1 such that ``d = J^T w`` has equal projections on every unit task
    gradient: ``w = G^+ n / sum(G^+ n)`` with ``n_k = ||g_k||`` (``(G w)_k = n_k / sum(G^+ n)``
    when G is invertible). Zero weights when ``sum(G^+ n)`` vanishes.
    """

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "imtl_g")
        gramian_n, _ = normalized_gramian(gramian, reg=0.0)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian_n), 0.0))
        v = jnp.linalg.pinv(gramian_n, hermitian=True) @ norms
        total = v.sum()
        ok = jnp.abs(total) > 1e-12
        return jnp.where(ok, v / jnp.where(ok, total, 1.0), 0.0), state

    return _gramian_method("imtl_g", num_tasks, update)


def make_aligned_mtl(num_tasks: int | None = None) -> Method:
    """Aligned-MTL (Senushkin et al., CVPR 2023, Alg. 1 / Eq. 8), LibMTL's Gramian form.

    Eigendecomposition ``G = V diag(lambda) V^T``; keeping the ``lambda > lambda_max K eps``
    components, ``B = sqrt(lambda_min) V diag(lambda^(-1/2)) V^T`` and ``w = B 1``: the update
    ``J^T w`` is the sum of the task gradients after making them orthogonal with equal norms
    (condition number 1), scaled by the smallest singular value.
    """

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "aligned_mtl")
        num = gramian.shape[0]
        gramian_n, scale = normalized_gramian(gramian, reg=0.0)
        eigvals, eigvecs = jnp.linalg.eigh(gramian_n)
        tol = jnp.max(eigvals) * num * jnp.finfo(gramian.dtype).eps
        kept = eigvals > tol
        lam_min = jnp.min(jnp.where(kept, eigvals, jnp.inf))
        inv_sqrt = jnp.where(kept, jax.lax.rsqrt(jnp.where(kept, eigvals, 1.0)), 0.0)
        balance = jnp.sqrt(lam_min) * (eigvecs * inv_sqrt) @ eigvecs.T
        weights = balance @ jnp.ones((num,), gramian.dtype)
        return jnp.where(scale > 0, weights, jnp.ones((num,), gramian.dtype) / num), state

    return _gramian_method("aligned_mtl", num_tasks, update)


# ---------------------------------------------------------------------------- UPGrad, DualProj


def _jd_gramian(gramian: jax.Array, norm_eps: float, reg_eps: float) -> jax.Array:
    """TorchJD's preprocessing: divide by the trace (unless below ``norm_eps``), add ``reg_eps I``."""
    gramian = 0.5 * (gramian + gramian.T)
    trace = jnp.trace(gramian)
    normalized = jnp.where(trace < norm_eps, 0.0, gramian / jnp.where(trace < norm_eps, 1.0, trace))
    return normalized + reg_eps * jnp.eye(gramian.shape[0], dtype=gramian.dtype)


def make_upgrad(
    num_tasks: int | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4, num_iters: int | None = None
) -> Method:
    """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization", Eq. 5).

    Projects each ``g_i / K`` onto the dual cone ``{x: J x >= 0}`` and sums:
    ``w = sum_i v_i`` with ``v_i = argmin_{v >= e_i / K} v^T G v`` (Prop. 1), G trace-normalised and
    ridged by ``reg_eps`` (TorchJD defaults). The result has a non-negative inner product with every
    task gradient. Solver: ``solvers.project_to_dual_cone`` on the K targets at once.
    """

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "upgrad")
        num = gramian.shape[0]
        gramian_jd = _jd_gramian(gramian, norm_eps, reg_eps)
        targets = jnp.eye(num, dtype=gramian.dtype) / num
        v = solvers.project_to_dual_cone(gramian_jd, targets, num_iters)
        return v.sum(axis=0), state

    return _gramian_method("upgrad", num_tasks, update)


def make_dualproj(
    num_tasks: int | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4, num_iters: int | None = None
) -> Method:
    """DualProj (Quinton & Rey 2024; GEM's projection, Lopez-Paz & Ranzato 2017, Eq. 11).

    Projects the mean gradient onto the dual cone: ``w = argmin_{v >= 1/K} v^T G v`` (G
    trace-normalised and ridged, TorchJD defaults). Solver: ``solvers.project_to_dual_cone``.
    """

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "dualproj")
        num = gramian.shape[0]
        gramian_jd = _jd_gramian(gramian, norm_eps, reg_eps)
        mean = jnp.full((num,), 1.0 / num, gramian.dtype)
        return solvers.project_to_dual_cone(gramian_jd, mean, num_iters), state

    return _gramian_method("dualproj", num_tasks, update)


# ---------------------------------------------------------------------------------- ConFIG


def make_config(num_tasks: int | None = None) -> Method:
    """ConFIG (Liu et al., ICLR 2025, Eq. 2 / TorchJD's ConFIG with unit preference).

    Direction ``u = pinv(U) 1`` with ``U`` the unit task gradients (rows ``g_k / ||g_k||``), made a
    unit vector, scaled by ``sum_k g_k . u``. With ``D = diag(||g_k||)``, ``pinv(U) = U^T (U U^T)^+``
    so ``pinv(U) 1 = J^T c`` with ``c = D^-1 (D^-1 G D^-1)^+ 1``; the result is
    ``J^T c (1^T G c) / (c^T G c)``. Zero-gradient tasks get weight 0.
    """

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "config")
        num = gramian.shape[0]
        inv_norm = _inv_norms(gramian)
        unit_gramian = gramian * inv_norm[:, None] * inv_norm[None, :]
        coef = inv_norm * (jnp.linalg.pinv(unit_gramian, hermitian=True) @ jnp.ones((num,), gramian.dtype))
        sq_norm = coef @ gramian @ coef
        length = jnp.sum(gramian @ coef)
        ok = sq_norm > 1e-20
        return jnp.where(ok, coef * length / jnp.where(ok, sq_norm, 1.0), 0.0), state

    return _gramian_method("config", num_tasks, update)


# -------------------------------------------------------------------------------- SDMGrad, MoDo


class SDMGradState(NamedTuple):
    """SDMGrad: the simplex weights ``w`` [K] its projected SGD steps start from."""

    w: jax.Array


def make_sdmgrad(num_tasks: int | None = None, lamda: float = 0.3, num_iters: int = 20,
                 double_sampling: bool = True) -> Method:
    """SDMGrad (Xiao, Ban & Ji, NeurIPS 2023, Alg. 1; LibMTL defaults lamda = 0.3, niter = 20).

    ``w`` (state, init 1/K) takes ``num_iters`` projected SGD steps (lr 5, momentum 0.5, momentum
    reset each call) on ``1/2 w^T G' w + lamda w^T G' 1/K`` with ``G'`` the cross Gramian of two
    independent batches scaled by ``mean_k sqrt(G'_kk)^2`` and projected onto the simplex; the
    update is ``(J^T w + lamda g_0) / (1 + lamda)``, i.e. weights ``(w + lamda / K) / (1 + lamda)``.
    Uses ``MethodInputs.cross_gramian`` when given (the paper's double sampling; the train step
    computes it when ``double_sampling``), else ``gramian``. State: ``SDMGradState(w [K])``.
    """

    def init(num_tasks: int):
        return SDMGradState(jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = inputs.cross_gramian
        if gramian is None:
            gramian = require(inputs, "gramian", "sdmgrad")
        num = gramian.shape[0]
        diag = jnp.maximum(jnp.diagonal(gramian), 0.0)
        scale = jnp.mean(jnp.sqrt(diag))
        gramian = gramian / (scale**2 + _EPS)
        mean_pull = jnp.mean(gramian, axis=1)

        def sgd_step(_, carry):
            w, momentum = carry
            grad = gramian @ w + lamda * mean_pull
            momentum = 0.5 * momentum + grad
            return solvers.project_to_simplex(w - 5.0 * momentum), momentum

        w, _ = jax.lax.fori_loop(0, num_iters, sgd_step, (state.w, jnp.zeros((num,), gramian.dtype)))
        return (w + lamda / num) / (1.0 + lamda), SDMGradState(w)

    return _gramian_method("sdmgrad", num_tasks, update, init, wants=("cross_gramian",) if double_sampling else ())


class MoDoState(NamedTuple):
    """MoDo: the simplex ``weights`` [K] (``lambda``)."""

    weights: jax.Array


def make_modo(num_tasks: int | None = None, gamma: float = 1e-3, rho: float = 0.1,
              double_sampling: bool = True) -> Method:
    """MoDo (Chen, Fernando, Ying & Chen, NeurIPS 2023, Alg. 1 / Eq. 9; LibMTL defaults).

    ``lambda <- Proj_simplex(lambda - gamma (G' lambda + rho lambda))`` with ``G' = J_1 J_2^T``
    the cross Gramian of two independent batches (``MethodInputs.cross_gramian``, computed by the
    train step when ``double_sampling``; ``gramian`` when None), on the raw (unnormalised) Gramian;
    weights = the new ``lambda`` (sum 1). State: ``MoDoState(weights [K])``.
    """

    def init(num_tasks: int):
        return MoDoState(jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = inputs.cross_gramian
        if gramian is None:
            gramian = require(inputs, "gramian", "modo")
        lam = state.weights
        lam = solvers.project_to_simplex(lam - gamma * (gramian @ lam + rho * lam))
        return lam, MoDoState(lam)

    return _gramian_method("modo", num_tasks, update, init, wants=("cross_gramian",) if double_sampling else ())


# ------------------------------------------------------------------------------------- DB-MTL


def make_db_mtl(num_tasks: int | None = None) -> Method:
    """DB-MTL (Lin et al. 2023, "Dual-Balancing for Multi-Task Learning", Eqs. 3-5), Gramian form.

    Loss-scale balancing: the log losses ``log L_k``, whose gradients are ``g_k / L_k`` (Gramian
    ``G_kl / (L_k L_l)``). Gradient-magnitude balancing: every log-loss gradient rescaled to the
    largest norm, ``sum_k (max_j n_j / n_k) g_k / L_k``, so ``w_k = max_j n_j / (n_k L_k)``.
    The paper (and LibMTL, DB_beta=0.9) applies this to an EMA of the log-loss *gradient vectors*,
    which needs the Jacobian; this Gramian form uses the current batch's gradients (beta = 0).
    Heads get ``grad L_k`` (``weights_heads=False``), not ``grad log L_k`` as in LibMTL.
    """

    def update(inputs: MethodInputs, state, key):
        del key
        gramian = require(inputs, "gramian", "db_mtl")
        inv_loss = 1.0 / (jnp.maximum(inputs.losses, 0.0) + _EPS)
        log_norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0)) * inv_loss
        balance = jnp.max(log_norms) / (log_norms + _EPS)
        return balance * inv_loss, state

    return _gramian_method("db_mtl", num_tasks, update)
