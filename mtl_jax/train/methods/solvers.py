"""Small K x K sub-problems of the gradient methods, solved on device with jnp / lax only.

Every solver is jittable and vmappable, does a fixed amount of work (no host round trip, no
data-dependent trip count: a ``lax.cond`` at most picks between an exact small-K solve and its
iterative fallback), and is meant for Gramians already scaled to unit mean diagonal
(``base.normalized_gramian``), so step sizes and tolerances are scale free.

* ``project_to_simplex``: Euclidean projection onto the probability simplex (sort based).
* ``minimize_on_simplex``: projected gradient with a best-of-grid step for any smooth convex
  objective on the simplex (CAGrad's dual, Eq. 5 of Liu et al. 2021).
* ``min_norm_on_simplex``: ``min_{w in simplex} w^T G w`` (MGDA, Sener & Koltun 2018, Eq. 3),
  exact over every active set for K <= ``EXACT_MAX_TASKS``; else projected gradient then an exact
  active-set KKT solve.
* ``project_to_dual_cone``: ``min_v v^T G v s.t. v >= u`` (UPGrad / DualProj, Quinton & Rey 2024,
  Prop. 1), the same two algorithms.
* ``solve_power_bargaining``: ``G w = w^(-1/alpha), w > 0`` (Nash-MTL, Navon et al. 2022, Eq. 3 for
  alpha=1; FairGrad, Ban & Ji 2024, Eq. 7), damped Newton on a strictly convex potential.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Step sizes tried at each projected-gradient iteration: 2^4 ... 2^-19 (24 candidates), so one
# iteration covers curvatures from ~1/16 to ~5e5 of a unit-diagonal Gramian.
_STEP_GRID = np.float32(2.0) ** np.arange(4, -20, -1, dtype=np.float32)  # numpy: importing must not start a backend


@jax.custom_batching.custom_vmap
def unbatched_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.linalg.solve(a, b)`` for one [K, K] system that stays one LAPACK call per system under
    ``vmap`` (the batch runs as a ``lax.map``). jaxlib's batched CPU LAPACK kernels fan their batch
    out into the XLA:CPU intra-op pool they already run on; two such calls at once deadlocked a
    batched SVD on a 2-core machine (see ``merging.svd_merging.task_svds``), and UPGrad vmaps its K
    dual-cone solves. Not differentiable (the solvers' outputs are stop-gradient weights)."""
    return jnp.linalg.solve(a, b)


@unbatched_solve.def_vmap
def _unbatched_solve_vmap(axis_size: int, in_batched, a, b):
    a, b = (x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip((a, b), in_batched))
    return jax.lax.map(lambda ab: unbatched_solve(*ab), (a, b)), True


def small_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``a x = b`` for one small [n, n] system (n <= ``EXACT_MAX_TASKS`` + 1 here):
    Gauss-Jordan elimination with partial pivoting, unrolled over n, in plain jnp ops, so a vmap
    over many systems stays one fused batch (no per-system LAPACK call). A singular system gives
    non-finite entries, which the callers' feasibility checks reject."""
    num = a.shape[-1]
    rows = jnp.arange(num)
    m = jnp.concatenate([a, b[:, None]], axis=1)
    for k in range(num):
        pivot_row = jnp.argmax(jnp.where(rows >= k, jnp.abs(m[:, k]), -1.0))
        row_k, row_p = m[k], jnp.take(m, pivot_row, axis=0)
        m = jnp.where((rows == k)[:, None], row_p[None], jnp.where((rows == pivot_row)[:, None], row_k[None], m))
        m = m.at[k].set(m[k] / m[k, k])
        m = m - jnp.where(rows == k, 0.0, m[:, k])[:, None] * m[k][None, :]
    return m[:, num]


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


def _projected_gradient(
    objective: Callable[[jax.Array], jax.Array],
    project: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    num_iters: int,
) -> jax.Array:
    """Projected gradient descent with a best-of-grid step.

    Each iteration evaluates ``project(x - t * grad f(x))`` for every ``t`` in ``_STEP_GRID``
    (vmapped) and keeps the best point, including the current one, so ``f`` never increases. On a
    strongly convex problem this converges linearly; the fixed ``num_iters`` is the only stopping
    rule.
    """
    grad_fn = jax.grad(objective)

    def body(_, x):
        g = grad_fn(x)
        candidates = jax.vmap(lambda t: project(x - t * g))(_STEP_GRID)
        candidates = jnp.concatenate([candidates, x[None]], axis=0)
        values = jax.vmap(objective)(candidates)
        values = jnp.where(jnp.isfinite(values), values, jnp.inf)
        return candidates[jnp.argmin(values)]

    return jax.lax.fori_loop(0, num_iters, body, x0)


def minimize_on_simplex(
    objective: Callable[[jax.Array], jax.Array], num_tasks: int, num_iters: int = 200, w0: jax.Array | None = None
) -> jax.Array:
    """``argmin_{w in simplex} objective(w)`` for a convex, differentiable ``objective``.

    Algorithm: for two tasks, a nested grid search over the segment (``_minimize_on_segment``;
    ``w0`` unused); for more, projected gradient descent from the uniform point (or ``w0``),
    ``num_iters`` iterations, best-of-grid step over 24 step sizes per iteration (monotone). No tolerance: the
    iteration count is fixed; on CAGrad's dual with K <= 40 and a unit-diagonal Gramian, 200
    iterations match SLSQP to ~1e-5 in objective (tests/methods/test_method_solvers.py).
    """
    if num_tasks == 2:
        return _minimize_on_segment(objective)
    x0 = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32) if w0 is None else w0
    return _projected_gradient(objective, project_to_simplex, x0, num_iters)


def _minimize_on_segment(objective: Callable[[jax.Array], jax.Array], points: int = 65, levels: int = 4) -> jax.Array:
    """``argmin`` of a convex ``objective`` over the two-task simplex ``w = (t, 1 - t)``, t in [0, 1]:
    a grid of ``points`` values of t, then ``levels - 1`` finer grids over the bracket around the
    best one (convexity keeps the minimiser inside it); t to within half the last grid step,
    ``(2 / (points - 1))^(levels - 1) / (2 (points - 1))`` (2.4e-7 by default), in four vmapped
    batches instead of an iteration loop."""
    fraction = jnp.linspace(0.0, 1.0, points, dtype=jnp.float32)
    low, high = jnp.float32(0.0), jnp.float32(1.0)
    best = jnp.float32(0.5)
    for _ in range(levels):
        t = low + (high - low) * fraction
        values = jax.vmap(lambda ti: objective(jnp.stack([ti, 1.0 - ti])))(t)
        best = t[jnp.argmin(jnp.where(jnp.isfinite(values), values, jnp.inf))]
        step = (high - low) / (points - 1)
        low, high = jnp.maximum(best - step, 0.0), jnp.minimum(best + step, 1.0)
    return jnp.stack([best, 1.0 - best])


def _polish(candidate: jax.Array, fallback: jax.Array, objective: Callable, feasible: jax.Array) -> jax.Array:
    """Keeps the exact active-set ``candidate`` when finite, feasible and no worse than ``fallback``."""
    ok = feasible & jnp.all(jnp.isfinite(candidate))
    safe = jnp.where(ok, candidate, fallback)
    # Feasible KKT points are optimal; the loose objective guard only catches a bad solve (the two
    # values agree to float32 rounding, which exceeds 1e-6 relative on flat objectives).
    reference = objective(fallback)
    ok = ok & (objective(safe) <= reference + 1e-4 * jnp.abs(reference) + 1e-9)
    return jnp.where(ok, safe, fallback)


# Up to this many tasks the quadratic sub-problems enumerate every active set (2^K - 1 exact KKT
# solves, one batch) instead of iterating: at K = 2 one projected-gradient solve (100 iterations of a
# 24-step grid) took ~0.5 ms of a ~9 ms MGDA step on a 2-core CPU.
EXACT_MAX_TASKS = 4


def _subsets(num: int, nonempty: bool) -> jax.Array:
    """[2^K (- 1), K] bool: every subset of K indices (the empty one too unless ``nonempty``)."""
    codes = np.arange(1 if nonempty else 0, 2**num)
    return jnp.asarray((codes[:, None] >> np.arange(num)) & 1, bool)


def _best_feasible(candidates: jax.Array, feasible: jax.Array, objective: Callable) -> tuple[jax.Array, jax.Array]:
    """The feasible candidate [..., C, K] with the lowest objective and whether there is one (per batch)."""
    values = jax.vmap(objective)(candidates.reshape(-1, candidates.shape[-1])).reshape(feasible.shape)
    values = jnp.where(feasible & jnp.all(jnp.isfinite(candidates), axis=-1) & jnp.isfinite(values), values, jnp.inf)
    best = jnp.argmin(values, axis=-1)
    pick = jnp.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    return pick, jnp.isfinite(jnp.take_along_axis(values, best[..., None], axis=-1)[..., 0])


def _min_norm_kkt(gramian: jax.Array, support: jax.Array, solve: Callable = unbatched_solve) -> tuple[jax.Array, jax.Array]:
    """The KKT point of ``min_{w in simplex} w^T G w`` on ``support`` [K] bool and its feasibility:
    ``(G w)_i = nu`` on the support, ``w_i = 0`` off it, ``sum w = 1``; feasible when ``w >= -1e-7``
    and ``(G w)_i >= nu - 1e-6`` off the support."""
    num = gramian.shape[0]
    eye = jnp.eye(num, dtype=gramian.dtype)
    top = jnp.where(support[:, None], gramian, eye)
    top = jnp.concatenate([top, jnp.where(support, -1.0, 0.0)[:, None]], axis=1)
    bottom = jnp.concatenate([jnp.ones((1, num), gramian.dtype), jnp.zeros((1, 1), gramian.dtype)], 1)
    system = jnp.concatenate([top, bottom], axis=0)
    rhs = jnp.concatenate([jnp.zeros((num,), gramian.dtype), jnp.ones((1,), gramian.dtype)])
    solution = solve(system, rhs)
    w_kkt, nu = solution[:num], solution[num]
    w_kkt = jnp.where(support, w_kkt, 0.0)
    grad = gramian @ w_kkt
    feasible = jnp.all(w_kkt >= -1e-7) & jnp.all(jnp.where(support, True, grad >= nu - 1e-6))
    w_kkt = jnp.maximum(w_kkt, 0.0)
    return w_kkt / jnp.maximum(w_kkt.sum(), 1e-12), feasible


def min_norm_on_simplex(gramian: jax.Array, num_iters: int = 100, active_tol: float = 1e-6) -> jax.Array:
    """Min-norm point of the convex hull of the task gradients: ``argmin_{w in simplex} w^T G w``.

    Algorithm: for K <= ``EXACT_MAX_TASKS``, the KKT system on every support (``(G w)_i = nu`` on
    it, ``w_i = 0`` off it, ``sum w = 1``), keeping the feasible point (``w >= -1e-7``,
    ``(G w)_i >= nu - 1e-6`` off the support) of lowest objective: exact, the convex problem's KKT
    points are its minima. Otherwise (or if no support is feasible in float32) ``num_iters``
    projected-gradient iterations (best-of-grid step), then the KKT solve on the guessed support
    ``{i: w_i > active_tol}``, kept when it is feasible and no worse.

    Args:
      gramian: [K, K] symmetric positive (semi)definite, ideally unit mean diagonal and ridged.
      num_iters: projected-gradient iterations before the active-set solve.
      active_tol: a weight below this is taken as zero in the active-set guess.

    Returns:
      w: [K] on the simplex.
    """
    num = gramian.shape[0]
    objective = lambda w: w @ gramian @ w

    def iterative():
        w_pg = minimize_on_simplex(objective, num, num_iters)
        w_kkt, feasible = _min_norm_kkt(gramian, w_pg > active_tol)
        return _polish(w_kkt, w_pg, objective, feasible)

    if num > EXACT_MAX_TASKS:
        return iterative()
    candidates, feasible = jax.vmap(lambda s: _min_norm_kkt(gramian, s, small_solve))(_subsets(num, nonempty=True))
    exact, found = _best_feasible(candidates, feasible, objective)
    return jax.lax.cond(found, lambda: exact, iterative)


def _dual_cone_kkt(gramian: jax.Array, u: jax.Array, free: jax.Array,
                   solve: Callable = unbatched_solve) -> tuple[jax.Array, jax.Array]:
    """The KKT point of ``min_{v >= u} v^T G v`` with ``free`` [K] bool the inactive bounds and its
    feasibility: ``(G v)_i = 0`` on the free set, ``v_i = u_i`` elsewhere; feasible when ``v >= u``
    and the multipliers ``(G v)_i >= 0`` on the active set (relative tolerance 1e-6)."""
    eye = jnp.eye(gramian.shape[0], dtype=gramian.dtype)
    v_kkt = solve(jnp.where(free[:, None], gramian, eye), jnp.where(free, 0.0, u))
    multipliers = gramian @ v_kkt
    scale = jnp.maximum(jnp.max(jnp.abs(multipliers)), 1e-12)
    feasible = jnp.all(v_kkt >= u - 1e-6 * jnp.maximum(jnp.abs(u), 1e-3)) & jnp.all(
        jnp.where(free, True, multipliers >= -1e-6 * scale)
    )
    return jnp.maximum(v_kkt, u), feasible


def project_to_dual_cone(gramian: jax.Array, u: jax.Array, num_iters: int = 100, active_tol: float = 1e-7) -> jax.Array:
    """Weights of the projection of ``J^T u`` onto the dual cone ``{x: J x >= 0}``.

    By Prop. 1 of Quinton & Rey (2024, "Jacobian Descent for Multi-Objective Optimization") the
    projection is ``J^T v`` with ``v = argmin_{v >= u} v^T G v`` (a box-constrained QP, the dual of
    GEM's Eq. 11). Algorithm: for K <= ``EXACT_MAX_TASKS``, the KKT system on every free set
    (``(G v)_i = 0`` there, ``v_i = u_i`` elsewhere), keeping the feasible point (``v >= u``,
    multipliers ``(G v)_i >= 0`` on the active set, tolerance 1e-6) of lowest objective. Otherwise
    (or if no free set is feasible in float32) ``num_iters`` projected-gradient iterations from
    ``v = u`` (projection ``max(v, u)``, best-of-grid step), then the KKT solve on the guessed free
    set ``{i: v_i > u_i + active_tol}``, kept when feasible and no worse.

    Args:
      gramian: [K, K] symmetric positive definite (ridged), ideally trace-normalised.
      u: [K] weights of the vector to project, or [M, K] for M projections (UPGrad's K), solved
        together (one fallback decision for the batch).

    Returns:
      v: like ``u``, with ``v >= u``; the projection is ``J^T v``.
    """
    num = gramian.shape[0]
    objective = lambda v: v @ gramian @ v

    def iterative_one(target):
        v_pg = _projected_gradient(objective, lambda v: jnp.maximum(v, target), target, num_iters)
        v_kkt, feasible = _dual_cone_kkt(gramian, target, v_pg > target + active_tol)
        return _polish(v_kkt, v_pg, objective, feasible)

    iterative = lambda: iterative_one(u) if u.ndim == 1 else jax.vmap(iterative_one)(u)
    if num > EXACT_MAX_TASKS:
        return iterative()
    free_sets = _subsets(num, nonempty=False)
    kkt = jax.vmap(lambda target: jax.vmap(lambda f: _dual_cone_kkt(gramian, target, f, small_solve))(free_sets))
    candidates, feasible = kkt(u.reshape(-1, num))
    exact, found = _best_feasible(candidates, feasible, objective)
    return jax.lax.cond(jnp.all(found), lambda: exact.reshape(u.shape), iterative)


def solve_power_bargaining(gramian: jax.Array, alpha: float = 1.0, num_iters: int = 30) -> jax.Array:
    """Positive solution of ``G w = w^(-1/alpha)`` (elementwise power).

    ``alpha = 1`` is the Nash bargaining solution of Nash-MTL (Navon et al. 2022, Eq. 3/Claim 3.1:
    ``G a = 1/a``); general ``alpha`` is FairGrad's alpha-fair allocation (Ban & Ji 2024, Eq. 7).
    It is the unique minimiser of the strictly convex potential
    ``f(w) = 1/2 w^T G w + sum_i phi(w_i)`` on ``w > 0`` with ``phi'(w) = -w^(-1/alpha)``
    (``phi = -log`` for alpha = 1), whose gradient is ``G w - w^(-1/alpha)``.

    Algorithm: ``num_iters`` damped Newton iterations from ``w = 1`` (Hessian
    ``G + diag(w^(-1/alpha - 1) / alpha)``), each with a fraction-to-boundary cap (stay at >= 1% of
    the current value) and a best-of-grid line search over 20 halvings that minimises the potential
    (ties within float32 rounding go to the smaller residual ``|w^(1/alpha) G w - 1|``). Newton converges
    quadratically near the solution; 30 iterations reach ``|G w - w^(-1/alpha)| < 1e-4`` on
    unit-diagonal ridged Gramians with K <= 40 (tests). Nash-MTL's original solves the same
    condition by a sequence of convex programs (CCP, ECOS on the CPU, ``optim_niter=20``).

    Args:
      gramian: [K, K] symmetric positive definite, unit mean diagonal (``normalized_gramian``).
      alpha: fairness exponent (> 0), a static Python float.
      num_iters: Newton iterations.

    Returns:
      w: [K] positive.
    """
    num = gramian.shape[0]
    inv_alpha = 1.0 / alpha
    solve = small_solve if num <= EXACT_MAX_TASKS else unbatched_solve  # no LAPACK call per iteration

    if alpha == 1.0:
        barrier = lambda w: -jnp.sum(jnp.log(w))
    else:
        power = 1.0 - inv_alpha
        barrier = lambda w: -jnp.sum(w**power) / power

    potential = lambda w: 0.5 * w @ gramian @ w + barrier(w)
    # Scale-free residual ``w^(1/alpha) (G w) - 1``, zero exactly at the solution: it breaks ties
    # between candidates whose potentials agree to rounding (float32 near the solution).
    residual = lambda w: jnp.sum((w**inv_alpha * (gramian @ w) - 1.0) ** 2)
    halvings = 0.5 ** jnp.arange(20, dtype=jnp.float32)

    def body(_, w):
        grad = gramian @ w - w ** (-inv_alpha)
        hessian = gramian + jnp.diag(inv_alpha * w ** (-inv_alpha - 1.0))
        step = -solve(hessian, grad)
        step = jnp.where(jnp.isfinite(step), step, 0.0)
        shrink = jnp.where(step < 0, -0.99 * w / jnp.where(step < 0, step, -1.0), jnp.inf)
        t_max = jnp.minimum(1.0, jnp.min(shrink))
        candidates = w[None] + (t_max * halvings)[:, None] * step[None]
        candidates = jnp.concatenate([candidates, w[None]], axis=0)
        positive = jnp.maximum(candidates, 1e-30)
        valid = jnp.all(candidates > 0, axis=1)
        values = jax.vmap(potential)(positive)
        values = jnp.where(jnp.isfinite(values) & valid, values, jnp.inf)
        best = jnp.min(values)
        near_best = values <= best + 1e-6 * (1.0 + jnp.abs(best))
        residuals = jax.vmap(residual)(positive)
        residuals = jnp.where(near_best & jnp.isfinite(residuals), residuals, jnp.inf)
        return candidates[jnp.argmin(residuals)]

    return jax.lax.fori_loop(0, num_iters, body, jnp.ones((num,), gramian.dtype))
