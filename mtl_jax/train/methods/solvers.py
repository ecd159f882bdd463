"""Small K x K sub-problems of the gradient methods, solved on device with jnp / lax only.

Every solver is jittable and vmappable, stays on device and runs a ``lax.while_loop`` with a
convergence test and an iteration cap (no Python loop over tasks).

* ``project_to_simplex``: Euclidean projection onto the probability simplex (sort based).
* ``min_norm_on_simplex``: ``min_{w in simplex} w^T G w`` (MGDA, Sener & Koltun 2018, Eq. 3).
* ``cagrad_dual``: ``min_{w in simplex} b^T w + rho sqrt(w^T G w + eps)`` (CAGrad's dual, Liu et
  al. 2021, Eq. 5, with ``b = G w_0``).
* ``project_to_dual_cone``: ``min_v v^T G v s.t. v >= u`` (UPGrad / DualProj, Quinton & Rey 2024,
  Prop. 1).
* ``solve_power_bargaining``: ``G w = w^(-1/alpha), w > 0`` (Nash-MTL, Navon et al. 2022, Eq. 3 for
  alpha=1; FairGrad, Ban & Ji 2024, Eq. 7).

The first three share one exact primal active-set method (``_active_set``); see its docstring.
In float32 they end at the KKT conditions to ~1e-7 of the rounding scale of ``G x`` (rows
``sqrt(G_jj) sum_i |x_i| sqrt(G_ii)``), and Nash-MTL / FairGrad at a backward residual of ~1e-7,
for K up to 64, gradient norms over four orders of magnitude and rank-deficient G
(``tests/methods/test_method_solvers.py`` checks 1e-6 against float64 references).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


@jax.custom_batching.custom_vmap
def unbatched_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.linalg.solve(a, b)`` for one [K, K] system that stays one LAPACK call per system under
    ``vmap`` (the batch runs as a ``lax.map``). jaxlib's batched CPU LAPACK kernels fan their batch
    out into the XLA:CPU intra-op pool they already run on; two such calls at once deadlocked a
    batched SVD on a 2-core machine (see ``merging.svd_merging.task_svds``), and UPGrad vmaps its K
    dual-cone solves. Not differentiable (the solvers' outputs are stop-gradient weights)."""
    return jnp.linalg.solve(a, b)


@jax.custom_batching.custom_vmap
def refined_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a^-1 b`` by one LU factorisation, a solve and one step of fixed-precision iterative
    refinement with the same factors (the second solve brings the componentwise backward error to
    a few float32 ulps, Skeel 1980); one LAPACK factorisation per system under ``vmap``, like
    ``unbatched_solve``."""
    factors = jax.scipy.linalg.lu_factor(a)
    x = jax.scipy.linalg.lu_solve(factors, b)
    return x + jax.scipy.linalg.lu_solve(factors, b - a @ x)


def _one_system_at_a_time(solve):
    def rule(axis_size: int, in_batched, a, b):
        a, b = (x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip((a, b), in_batched))
        return jax.lax.map(lambda ab: solve(*ab), (a, b)), True

    solve.def_vmap(rule)


_one_system_at_a_time(unbatched_solve)
_one_system_at_a_time(refined_solve)


def project_to_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` [K] onto ``{w >= 0, sum w = 1}`` (Held et al. 1974; sort based).

    Finds ``theta`` such that ``sum max(v - theta, 0) = 1`` from the sorted entries; exact, O(K log K).
    """
    num = v.shape[0]
    u = jnp.sort(v)[::-1]
    cumsum = jnp.cumsum(u)
    ranks = jnp.arange(1, num + 1, dtype=v.dtype)
    active = u - (cumsum - 1.0) / ranks > 0
    rho = jnp.max(jnp.where(active, ranks, 1.0))
    theta = (jnp.take(cumsum, rho.astype(jnp.int32) - 1) - 1.0) / rho
    return jnp.maximum(v - theta, 0.0)


# ------------------------------------------------------------------------- exact active set

# An index joins the free set when its multiplier is below -ADD_TOL times its rounding scale.
ADD_TOL = 1e-7
# A face whose newest index has a Schur complement (on the unit-diagonal scale: the squared sine of
# its angle to the other gradients' affine / linear span) below this is numerically singular.
SINGULAR_TOL = 1e-6
# The cheap first phase hands over to the exact one at a Schur complement below this.
FAST_SINGULAR_TOL = 1e-4


def default_max_iters(num_tasks: int) -> int:
    """Iteration cap of one active-set phase: each task joins (and leaves) the free set about once
    on the problems met here; the cap only guards against cycling on ties."""
    return 4 * num_tasks + 8


def _unit_scales(gramian: jax.Array) -> jax.Array:
    """Powers of two ``s_i ~ 1/sqrt(G_ii)`` (1 for a zero gradient): ``diag(s) G diag(s)`` has a unit
    diagonal, exactly scaled, so a solve sees the correlations, not the spread of gradient norms."""
    diag = jnp.diagonal(gramian)
    positive = diag > jnp.finfo(gramian.dtype).tiny
    exponent = jnp.round(-0.5 * jnp.log2(jnp.where(positive, diag, 1.0))).astype(jnp.int32)
    return jnp.where(positive, jnp.ldexp(jnp.ones_like(diag), exponent), 1.0)


def _rounding_scale(gramian: jax.Array, x: jax.Array) -> jax.Array:
    """``sqrt(G_jj) sum_i |x_i| sqrt(G_ii)``, a bound on ``|(G x)_j|`` (Cauchy-Schwarz per entry) and
    the scale of its rounding error; KKT tolerances are relative to it."""
    root = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
    return root * (root @ jnp.abs(x)) + jnp.finfo(gramian.dtype).tiny


def _quadratic(gramian: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x^T G x`` and its size ``(sum_i |x_i| sqrt(G_ii))^2`` (an ``_active_set`` objective)."""
    root = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
    return x @ gramian @ x, (root @ jnp.abs(x)) ** 2


def _active_set(
    face: Callable, gradient: Callable, objective: Callable, lower: jax.Array, x: jax.Array, free: jax.Array,
    simplex: bool, max_iters: int, factor: jax.Array | None = None, pivot: Callable | None = None,
    singular_tol: float = SINGULAR_TOL, stop_at_singular: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Primal active-set method (Nocedal & Wright, Alg. 16.3; Lawson-Hanson's NNLS loop; Wolfe's
    min-norm-point algorithm on the simplex) for a convex ``objective`` on ``{x >= lower}``
    (``simplex``: also ``sum x = 1``, with ``lower = 0``).

    State: a feasible ``x`` and the free set F (``x_i = lower_i`` off F). Each iteration
    ``face(F, factor, j)`` minimises the objective on the affine set through the face (``x_i =
    lower_i`` off F, and ``sum x = 1`` on the simplex). If that minimiser ``y`` is feasible,
    ``x <- y`` and the index with the most negative scaled multiplier ``(g_j - nu) / s_j`` (``g``
    the gradient, ``nu = x^T g`` on the simplex, else 0; ``s`` the rounding scale of ``g``, e.g.
    ``(|G| |x|)_j``, plus that of ``nu``, ``x^T s``) joins F, unless none is below
    ``-ADD_TOL``: then ``x`` satisfies the KKT conditions (primal feasibility, ``g_j - nu = 0`` on
    F, ``>= 0`` off it, complementarity) and the loop stops. If ``y`` is infeasible, ``x`` moves
    toward it up to the first bound it meets (the objective decreases along the segment, by
    convexity) and that index leaves F. ``face`` may instead return a descent direction along
    which the objective is unbounded on the affine set (CAGrad's dual); the step then goes to the
    first bound. ``factor`` is optional solver state for ``face`` (an inverse of the face matrix),
    kept current by ``pivot(factor, F, j, joins)`` whenever j joins or leaves F.

    Rank deficiency: started from a vertex (simplex) or from ``x = lower``, an index joins F only
    when its multiplier is negative, which in exact arithmetic keeps the face system nonsingular
    (the gradients on F stay affinely / linearly independent: Wolfe 1976; Lawson & Hanson 1974,
    Ch. 23), so no ridge is needed. In float32 a rounding-level multiplier can still pick a
    dependent index: ``face`` also returns the newest index's Schur complement on the
    unit-diagonal scale, and an index whose complement is below ``singular_tol``, or that the
    next step would move back to its bound, or whose face is not finite or raises the objective,
    is taken out again and barred until F loses an index (``stop_at_singular``: the loop stops
    there instead). A step on an established face that is not finite or raises the objective ends
    the loop at the current (feasible) ``x``; so does ``max_iters``.

    Args:
      face: ``(F, factor, newest) -> (y, direction, bounded, schur)`` (``newest`` -1: none).
      gradient: ``x -> (g, scale)`` with ``scale`` the rounding scale of ``g`` (``_rounding_scale``).
      objective: ``x -> (f(x), size)``; a step may raise f by at most ``1e-5 size`` (``size``
        bounds the magnitude of f's terms, e.g. ``|x|^T |G| |x|``: rounding near a zero optimum).
      lower: [K] bounds; x: [K] feasible start; free: [K] bool, its free set.

    Returns:
      ``(x, F)`` where the loop stopped.
    """
    index = jnp.arange(x.shape[0])

    def cond(state):
        return (~state[-1]) & (state[-2] < max_iters)

    def body(state):
        x, free, barred, factor, newest, it, _ = state
        target, direction, bounded, schur = face(free, factor, newest)
        step = jnp.where(free, jnp.where(bounded, target - x, direction), 0.0)
        shrinking = free & (step < 0)
        ratio = jnp.where(shrinking, (x - lower) / jnp.where(shrinking, -step, 1.0), jnp.inf)
        blocking = jnp.argmin(ratio)
        t_block = jnp.maximum(ratio[blocking], 0.0)
        blocked = t_block < jnp.where(bounded, 1.0, jnp.inf)
        moved = jnp.maximum(x + jnp.where(blocked, t_block, 0.0) * step, lower)
        x_new = jnp.where(blocked, jnp.where(index == blocking, lower, moved), jnp.where(bounded, target, x))
        (f_old, size), (f_new, _) = objective(x), objective(x_new)
        ok = jnp.all(jnp.isfinite(x_new)) & (f_new <= f_old + 1e-5 * size)
        undo = (newest >= 0) & (~ok | (schur < singular_tol) | ~jnp.isfinite(schur) | (blocked & (blocking == newest)))
        ok = ok & ~undo
        x_next = jnp.where(ok, x_new, x)
        dropped = jnp.where(undo, index == newest, ok & blocked & (index == blocking))
        free_next = free & ~dropped
        barred = jnp.where(undo, barred | (index == newest), barred & ~(ok & blocked))
        g, scale = gradient(x_next)
        nu, nu_scale = (x_next @ g, x_next @ scale) if simplex else (0.0, 0.0)
        violation = jnp.where(free_next | barred, jnp.inf, (g - nu) / (scale + nu_scale))
        j = jnp.argmin(violation)
        at_minimiser = ok & ~blocked
        add = at_minimiser & (violation[j] < -ADD_TOL)
        done = (at_minimiser & ~add) | ((~ok & ~undo) if not stop_at_singular else ~ok)
        if pivot is not None:
            leaving = jnp.where(undo, newest, blocking)
            changed = jnp.where(add, pivot(factor, free_next, j, True), pivot(factor, free, leaving, False))
            factor = jnp.where(add | undo | (ok & blocked), changed, factor)
        free_next = free_next | (add & (index == j))
        return x_next, free_next, barred, factor, jnp.where(add, j, -1), it + 1, done

    factor = jnp.zeros(()) if factor is None else factor
    state = (x, free, jnp.zeros_like(free), factor, jnp.int32(-1), jnp.int32(0), jnp.bool_(False))
    x, free, *_ = jax.lax.while_loop(cond, body, state)
    return x, free


def _lu_solve(a: jax.Array, b: jax.Array, newest: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x = a^-1 b`` (``refined_solve``) and ``1 / (a^-1)_jj`` for ``j = newest`` (from an extra
    right-hand side e_j), the Schur complement of index j in ``a``."""
    num = a.shape[0]
    unit = (jnp.arange(num) == newest).astype(a.dtype)
    rhs = jnp.concatenate([b.reshape(num, -1), unit[:, None]], axis=1)
    x = refined_solve(a, rhs)
    schur = jnp.where(newest >= 0, 1.0 / (unit @ x[:, -1]), jnp.inf)
    return x[:, :-1].reshape(b.shape), schur


def _bordered_solve(gramian: jax.Array, scale: jax.Array, free: jax.Array, rhs: jax.Array, total: jax.Array,
                    newest: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` [K, m] of ``(G x)_i - nu = rhs_i`` on F, ``x_i = 0`` off it, ``sum x = total`` (one
    system per column of ``rhs`` [K, m] / ``total`` [m]): the KKT system of a quadratic on the
    face of the simplex. Solved as the symmetric scaling ``x = s x'``, ``nu = r nu'`` of
    ``[[G_FF, -1], [1^T, 0]]`` (``s = _unit_scales``, ``r = 1 / max_F s``), which is nonsingular
    when the gradients on F are affinely independent, even where ``G_FF`` is singular. Also the
    Schur complement of index ``newest`` (``_lu_solve``)."""
    num = gramian.shape[0]
    eye = jnp.eye(num, dtype=gramian.dtype)
    both = free[:, None] & free[None, :]
    r = 1.0 / jnp.max(jnp.where(free, scale, 0.0))
    border = jnp.where(free, scale * r, 0.0)
    top = jnp.concatenate([jnp.where(both, scale[:, None] * gramian * scale[None, :], eye), -border[:, None]], 1)
    bottom = jnp.concatenate([border, jnp.zeros((1,), gramian.dtype)])[None]
    rhs_scaled = jnp.concatenate([jnp.where(free[:, None], scale[:, None] * rhs, 0.0), r * total[None]], 0)
    solution, schur = _lu_solve(jnp.concatenate([top, bottom], 0), rhs_scaled, newest)
    return jnp.where(free[:, None], scale[:, None] * solution[:num], 0.0), schur


def _simplex_start(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The vertex ``e_i`` of lowest objective ``values[i]`` and its one-index free set."""
    best = jnp.argmin(values)
    vertex = jax.nn.one_hot(best, values.shape[0], dtype=values.dtype)
    return vertex, vertex > 0


def _finish_simplex(w: jax.Array) -> jax.Array:
    w = jnp.maximum(w, 0.0)
    return w / jnp.maximum(w.sum(), jnp.finfo(w.dtype).tiny)


def min_norm_on_simplex(gramian: jax.Array, max_iters: int | None = None) -> jax.Array:
    """Min-norm point of the convex hull of the task gradients: ``argmin_{w in simplex} w^T G w``.

    Algorithm: ``_active_set`` (here Wolfe's min-norm-point algorithm) from the vertex of the
    smallest gradient, one refined LU solve per iteration. On a face F the minimiser solves
    ``(G w)_i = nu`` on F, ``w_i = 0`` off it, ``sum w = 1`` (``_bordered_solve``); at the end
    ``(G w)_j >= nu = w^T G w`` for every j (to ``ADD_TOL`` relative), the KKT conditions of this
    convex problem, so ``w`` is the minimiser. Exact for any K; no ridge needed (rank-deficient G:
    see ``_active_set``), so MGDA passes its Gramian unridged.

    Args:
      gramian: [K, K] symmetric positive semidefinite (any scale; unit mean diagonal is typical).
      max_iters: iteration cap, default ``default_max_iters(K)``.

    Returns:
      w: [K] on the simplex.
    """
    num = gramian.shape[0]
    scale = _unit_scales(gramian)
    x0, free0 = _simplex_start(jnp.diagonal(gramian))
    zeros, one = jnp.zeros((num, 1), gramian.dtype), jnp.ones((1,), gramian.dtype)

    def face(free, _, newest):
        solution, schur = _bordered_solve(gramian, scale, free, zeros, one, newest)
        return solution[:, 0], zeros[:, 0], jnp.bool_(True), schur

    w, _ = _active_set(face, lambda w: (gramian @ w, _rounding_scale(gramian, w)), lambda w: _quadratic(gramian, w),
                       jnp.zeros((num,), gramian.dtype), x0, free0, True, max_iters or default_max_iters(num))
    return _finish_simplex(w)


def cagrad_dual(gramian: jax.Array, linear: jax.Array, radius: jax.Array, eps: float = 1e-8,
                max_iters: int | None = None) -> jax.Array:
    """``argmin_{w in simplex} F(w) = b^T w + rho sqrt(w^T G w + eps)`` (``b = linear``,
    ``rho = radius``): CAGrad's dual (Liu et al. 2021, Eq. 5) with ``b = G w_0``.

    Algorithm: ``_active_set`` from the best vertex. On the simplex ``eps = eps (sum
    w)^2``, so F is ``b^T w + rho ||w||_{G + eps 11^T}``. On a face F, stationarity is ``b_i + (rho
    / sqrt(q)) (G w)_i = nu`` (``q = w^T G w + eps``); with ``t = sqrt(q) / rho`` its solution is
    ``w = w0 + t w1``, where ``w0`` solves the min-norm face system (right side 0, ``sum w = 1``)
    and ``w1`` the one with right side ``-b`` and ``sum w = 0`` (two columns of one
    ``_bordered_solve``). As ``w0^T G w1 = 0``, ``q = q0 + eps + t^2 q1`` (``q0 = w0^T G w0``,
    ``q1 = w1^T G w1``) and ``t = sqrt((q0 + eps) / (rho^2 - q1))``; when ``rho^2 <= q1``, F
    decreases without bound along ``w1`` on the affine hull of the face and the step goes to the
    first bound. Exact (KKT) like ``min_norm_on_simplex``; ``rho = 0`` gives the best vertex.

    Returns:
      w: [K] on the simplex.
    """
    num = gramian.shape[0]
    scale = _unit_scales(gramian)
    root = jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0))
    # rounding scale of b = G w_0 (w_0 uniform, CAGrad's) and of the gradient below
    bound_linear = root * (root @ jnp.full((num,), 1.0 / num, gramian.dtype)) + jnp.abs(linear)
    norm = lambda w: jnp.sqrt(jnp.maximum(w @ gramian @ w, 0.0) + eps)
    size = lambda w: jnp.abs(linear) @ jnp.abs(w) + radius * jnp.sqrt((root @ jnp.abs(w)) ** 2 + eps)
    objective = lambda w: (linear @ w + radius * norm(w), size(w))
    rhs = jnp.stack([jnp.zeros((num,), gramian.dtype), -linear], axis=1)
    total = jnp.array([1.0, 0.0], gramian.dtype)

    def face(free, _, newest):
        solution, schur = _bordered_solve(gramian, scale, free, rhs, total, newest)
        w0, w1 = solution[:, 0], solution[:, 1]
        slack = radius**2 - w1 @ gramian @ w1
        t = jnp.sqrt((jnp.maximum(w0 @ gramian @ w0, 0.0) + eps) / jnp.where(slack > 0, slack, 1.0))
        bounded = (slack > 0) & jnp.isfinite(t)
        return w0 + jnp.where(bounded, t, 0.0) * w1, w1, bounded, schur

    def gradient(w):
        n = norm(w)
        return linear + (radius / n) * (gramian @ w), bound_linear + (radius / n) * _rounding_scale(gramian, w)

    x0, free0 = _simplex_start(linear + radius * jnp.sqrt(jnp.maximum(jnp.diagonal(gramian), 0.0) + eps))
    w, _ = _active_set(face, gradient, objective, jnp.zeros((num,), gramian.dtype), x0, free0, True,
                       max_iters or default_max_iters(num))
    return _finish_simplex(w)


def _pivot(scaled: jax.Array, inverse: jax.Array, free: jax.Array, j: jax.Array, joins: jax.Array) -> jax.Array:
    """``(M_FF)^-1`` (zero outside F) after index j joins (``joins``) or leaves F: a symmetric
    principal pivot, O(K^2). Joining, with ``b = M_Fj``, ``h = (M_FF)^-1 b`` and the Schur complement
    ``c = M_jj - b^T h``: ``+ (h - e_j)(h - e_j)^T / c``. Leaving: ``- H_:j H_j: / H_jj``, row and
    column j then zero."""
    onehot = jnp.arange(scaled.shape[0]) == j
    column = jnp.where(free, scaled[:, j], 0.0)
    h = inverse @ column
    grow = h - onehot
    joined = inverse + jnp.outer(grow, grow) / (scaled[j, j] - column @ h)
    kept = inverse[:, j]
    left = jnp.where(onehot[:, None] | onehot[None, :], 0.0, inverse - jnp.outer(kept, kept) / kept[j])
    return jnp.where(joins, joined, left)


def _project_one(gramian: jax.Array, u: jax.Array, scale: jax.Array, max_iters: int) -> jax.Array:
    num = gramian.shape[0]
    eye = jnp.eye(num, dtype=gramian.dtype)
    scaled = scale[:, None] * gramian * scale[None, :]
    fixed = lambda free: jnp.where(free, 0.0, u / scale)
    none = jnp.zeros_like(u)

    def fast(free, inverse, newest):  # (G v)_i = 0 on F, v_i = u_i off it, from the pivoted (M_FF)^-1
        schur = jnp.where(newest >= 0, 1.0 / inverse[newest, newest], jnp.inf)
        return jnp.where(free, -scale * (inverse @ (scaled @ fixed(free))), u), none, jnp.bool_(True), schur

    def exact(free, _, newest):  # the same system by LU, for v = s v' (unit-diagonal rows), refined
        solution, schur = _lu_solve(jnp.where(free[:, None], scaled, eye), fixed(free), newest)
        return jnp.where(free, scale * solution, u), none, jnp.bool_(True), schur

    gradient = lambda v: (gramian @ v, _rounding_scale(gramian, v))
    objective = lambda v: _quadratic(gramian, v)
    pivot = lambda inverse, free, j, joins: _pivot(scaled, inverse, free, j, joins)
    # Fast phase (stops at a nearly singular face), then the exact one from where it stopped, which
    # confirms the KKT conditions in one iteration or carries on where rounding misled the first.
    v, free = _active_set(fast, gradient, objective, u, u, jnp.zeros((num,), bool), False, max_iters,
                          jnp.zeros_like(scaled), pivot, FAST_SINGULAR_TOL, stop_at_singular=True)
    return _active_set(exact, gradient, objective, u, v, free, False, max_iters)[0]


def project_to_dual_cone(gramian: jax.Array, u: jax.Array, max_iters: int | None = None) -> jax.Array:
    """Weights of the projection of ``J^T u`` onto the dual cone ``{x: J x >= 0}``.

    By Prop. 1 of Quinton & Rey (2024, "Jacobian Descent for Multi-Objective Optimization") the
    projection is ``J^T v`` with ``v = argmin_{v >= u} v^T G v`` (a box-constrained QP, the dual of
    GEM's Eq. 11; TorchJD solves it with ``qpsolvers``). Algorithm: ``_active_set``
    (Lawson-Hanson's loop) from ``v = u`` with every bound active; on a free set F the face
    minimiser solves ``(G v)_i = 0`` on F, ``v_i = u_i`` off it, first from an inverse of the scaled
    ``G_FF`` updated by one principal pivot per change of F (``_pivot``, O(K^2): no K x K solve
    per iteration, which matters as UPGrad runs K projections), then confirmed by LU. At the end
    the multipliers ``(G v)_j`` are ``>= 0`` on the active bounds (to ``ADD_TOL`` relative) and
    ``0`` on F: the KKT conditions, so ``v`` is the minimiser. Exact for any K; rank-deficient G:
    see ``_active_set`` (the methods also ridge G).

    Args:
      gramian: [K, K] symmetric positive semidefinite, ideally trace-normalised.
      u: [K] weights of the vector to project, or [M, K] for M projections (UPGrad's K), vmapped.
      max_iters: iteration cap per projection and phase, default ``default_max_iters(K)``.

    Returns:
      v: like ``u``, with ``v >= u``; the projection is ``J^T v``.
    """
    num = gramian.shape[0]
    scale = _unit_scales(gramian)
    cap = max_iters or default_max_iters(num)
    one = lambda target: _project_one(gramian, target, scale, cap)
    return one(u) if u.ndim == 1 else jax.vmap(one)(u)


def solve_power_bargaining(gramian: jax.Array, alpha: float = 1.0, max_iters: int | None = None) -> jax.Array:
    """Positive solution of ``G w = w^(-1/alpha)`` (elementwise power).

    ``alpha = 1`` is the Nash bargaining solution of Nash-MTL (Navon et al. 2022, Eq. 3/Claim 3.1:
    ``G a = 1/a``); general ``alpha`` is FairGrad's alpha-fair allocation (Ban & Ji 2024, Eq. 7).
    It is the unique minimiser of the strictly convex potential
    ``f(w) = 1/2 w^T G w + sum_i phi(w_i)`` on ``w > 0`` with ``phi'(w) = -w^(-1/alpha)``
    (``phi = -log`` for alpha = 1), whose gradient is ``r(w) = G w - w^(-1/alpha)``.

    Algorithm: Newton's method from ``w = 1`` in a ``lax.while_loop``: the step ``d`` solves
    ``(G + diag(w^(-1/alpha - 1) / alpha)) d = -r(w)`` (symmetrically scaled to a unit diagonal,
    one LU solve), capped so that w stays at >= 1% of its value; the step length is the largest
    of ``t_max 2^-k`` (k < 20, vmapped) meeting the Armijo condition ``f(w + t d) <= f(w) + 1e-4 t
    r^T d`` up to f's float32 rounding (``1e-6`` of the size of its terms), so far from the
    solution f decreases (global convergence) and near it the full, quadratically convergent
    steps are taken even where f no longer resolves the decrease. It stops when the backward
    residual ``max_i |r_i| / ((|G| w)_i + w_i^(-1/alpha))`` is below 2 float32 ulps, when a step
    changes no ``w_i`` by more than ``1e-6`` relative, when no step length is accepted, or after
    ``max_iters`` (default 60) iterations. The result has a backward residual
    ``|G w - w^(-1/alpha)|_i <= ~1e-7 ((|G| w)_i + w_i^(-1/alpha))``, float32's resolution (tests);
    the relative residual ``|w^(1/alpha) (G w) - 1|`` equals it where G w has no cancellation.
    Nash-MTL's original solves the same condition by a sequence of convex programs (CCP, ECOS on
    the CPU, ``optim_niter=20``); FairGrad's by scipy ``least_squares``.

    Args:
      gramian: [K, K] symmetric positive definite, unit mean diagonal (``normalized_gramian``).
      alpha: fairness exponent (> 0), a static Python float.
      max_iters: Newton iteration cap (default 60).

    Returns:
      w: [K] positive.
    """
    num = gramian.shape[0]
    inv_alpha = 1.0 / alpha
    if alpha == 1.0:
        barrier = lambda w: (-jnp.sum(jnp.log(w)), jnp.sum(jnp.abs(jnp.log(w))))
    else:
        power = 1.0 - inv_alpha
        barrier = lambda w: (-jnp.sum(w**power) / power, jnp.sum(w**power) / abs(power))

    def potential(w):
        value, size = barrier(w)
        return 0.5 * w @ gramian @ w + value, 0.5 * jnp.abs(w) @ jnp.abs(gramian) @ jnp.abs(w) + size

    lengths = 0.5 ** jnp.arange(20, dtype=gramian.dtype)
    magnitude = jnp.abs(gramian)

    def cond(state):
        return (~state[-1]) & (state[-2] < (max_iters or 60))

    def body(state):
        w, it, _ = state
        target = w ** (-inv_alpha)
        residual = gramian @ w - target
        hessian = gramian + jnp.diag(inv_alpha * w ** (-inv_alpha - 1.0))
        scale = _unit_scales(hessian)
        step = -scale * unbatched_solve(scale[:, None] * hessian * scale[None, :], scale * residual)
        step = jnp.where(jnp.isfinite(step), step, 0.0)
        shrink = jnp.where(step < 0, -0.99 * w / jnp.where(step < 0, step, -1.0), jnp.inf)
        t = jnp.minimum(1.0, jnp.min(shrink)) * lengths
        candidates = w[None] + t[:, None] * step[None]
        values, _ = jax.vmap(potential)(jnp.maximum(candidates, jnp.finfo(w.dtype).tiny))
        value, size = potential(w)
        accept = (jnp.all(candidates > 0, axis=1) & jnp.isfinite(values)
                  & (values <= value + 1e-4 * t * (residual @ step) + 1e-6 * size))
        t_best = jnp.where(jnp.any(accept), t[jnp.argmax(accept)], 0.0)
        w_new = w + t_best * step
        converged = jnp.max(jnp.abs(residual) / (magnitude @ w + target)) <= 2 * jnp.finfo(w.dtype).eps
        done = converged | (t_best == 0) | (jnp.max(jnp.abs(t_best * step) / w) <= 1e-6)
        return w_new, it + 1, done

    state = (jnp.ones((num,), gramian.dtype), jnp.int32(0), jnp.bool_(False))
    return jax.lax.while_loop(cond, body, state)[0]
