"""On-device K x K solvers against scipy.optimize references on random problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import least_squares, minimize

from mtl_jax.train.methods import solvers
from mtl_jax.train.methods.base import normalized_gramian

SHAPES = [(2, 5), (3, 2), (10, 50), (24, 30)]


def random_gramian(num, dim, seed, reg=1e-6):
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(num, dim)).astype(np.float32)
    jac[0] *= -1.0  # at least one conflicting pair
    gramian_n, _ = normalized_gramian(jnp.asarray(jac @ jac.T), reg)
    return gramian_n, np.asarray(gramian_n, np.float64)


def slsqp_on_simplex(objective, num):
    result = minimize(
        objective,
        np.full(num, 1.0 / num),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * num,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},),
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    return result.fun


def test_project_to_simplex_matches_qp():
    rng = np.random.default_rng(0)
    project = jax.jit(solvers.project_to_simplex)
    for num in (1, 2, 5, 17):
        v = rng.normal(size=num).astype(np.float32) * 2
        w = np.asarray(project(jnp.asarray(v)))
        reference = minimize(
            lambda x: np.sum((x - v) ** 2),
            np.full(num, 1.0 / num),
            method="SLSQP",
            bounds=[(0.0, None)] * num,
            constraints=({"type": "eq", "fun": lambda x: x.sum() - 1.0},),
            options={"ftol": 1e-14},
        ).x
        np.testing.assert_allclose(w, reference, atol=1e-5)
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-5


@pytest.mark.parametrize("num,dim", SHAPES)
def test_min_norm_on_simplex_matches_slsqp(num, dim):
    gramian, g64 = random_gramian(num, dim, seed=num * 100 + dim)
    w = np.asarray(jax.jit(solvers.min_norm_on_simplex)(gramian), np.float64)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-5
    assert w @ g64 @ w <= slsqp_on_simplex(lambda x: x @ g64 @ x, num) + 2e-6


@pytest.mark.parametrize("num,dim", SHAPES)
def test_cagrad_dual_matches_slsqp(num, dim):
    gramian, g64 = random_gramian(num, dim, seed=7 + num, reg=0.0)
    mean = np.full(num, 1.0 / num)
    radius = 0.5 * np.sqrt(mean @ g64 @ mean + 1e-8)
    dual64 = lambda w: w @ g64 @ mean + radius * np.sqrt(w @ g64 @ w + 1e-8)
    dual = lambda w: w @ gramian @ mean + radius * jnp.sqrt(w @ gramian @ w + 1e-8)
    w = np.asarray(jax.jit(lambda: solvers.minimize_on_simplex(dual, num, 200))(), np.float64)
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-5
    assert dual64(w) <= slsqp_on_simplex(dual64, num) + 1e-5


@pytest.mark.parametrize("num,dim", SHAPES)
def test_dual_cone_projection_matches_lbfgsb(num, dim):
    gramian, g64 = random_gramian(num, dim, seed=3 * num + dim, reg=1e-4)
    rng = np.random.default_rng(num)
    project = jax.jit(jax.vmap(solvers.project_to_dual_cone, in_axes=(None, 0)))
    targets = np.concatenate([np.eye(num) / num, rng.uniform(0, 1, size=(2, num))]).astype(np.float32)
    values = np.asarray(project(gramian, jnp.asarray(targets)), np.float64)
    for u, v in zip(targets.astype(np.float64), values):
        reference = minimize(
            lambda x: x @ g64 @ x,
            u + 0.1,
            jac=lambda x: 2 * g64 @ x,
            method="L-BFGS-B",
            bounds=[(ui, None) for ui in u],
            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000},
        )
        assert np.all(v >= u - 1e-6)
        assert v @ g64 @ v <= reference.fun * (1 + 1e-5) + 1e-9


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("num,dim", [(2, 5), (24, 30)])
def test_power_bargaining_matches_least_squares(num, dim, alpha):
    gramian, g64 = random_gramian(num, dim, seed=num + dim, reg=1e-4)
    solve = jax.jit(solvers.solve_power_bargaining, static_argnums=1)
    w = np.asarray(solve(gramian, alpha), np.float64)
    assert np.all(w > 0)
    rhs = w ** (-1.0 / alpha)
    assert np.max(np.abs(g64 @ w - rhs) / rhs) < 1e-3
    # FairGrad's reference solver (LibMTL): scipy least_squares from 1/K with w >= 0.
    reference = least_squares(
        lambda x: g64 @ x - np.power(1.0 / x, 1.0 / alpha),
        np.full(num, 1.0 / num),
        bounds=(1e-12, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    ).x
    np.testing.assert_allclose(w, reference, rtol=2e-3)


def test_vmapped_solves_stay_one_lapack_call_per_system():
    """UPGrad vmaps its K dual-cone projections; their KKT solves must lower to unbatched LAPACK
    calls (jaxlib's batched CPU kernels fan out into the intra-op pool they run on, the pattern that
    deadlocked batched SVDs), and give the same values as batched ``jnp.linalg.solve``."""
    import re

    from mtl_jax.train.methods import MethodInputs, get_method

    rng = np.random.default_rng(5)
    jac = rng.normal(size=(5, 12)).astype(np.float32)
    gram = jnp.asarray(jac @ jac.T)
    upgrad = get_method("upgrad", num_tasks=5)
    update = jax.jit(lambda g: upgrad.update(MethodInputs(losses=jnp.ones(5), step=0, gramian=g), None,
                                             jax.random.key(0))[0])
    calls = [line for line in update.lower(gram).as_text().splitlines() if re.search(r"custom_call @lapack_", line)]
    assert calls and all('num_batch_dims = "0"' in line for line in calls), calls
    systems = jnp.asarray(rng.normal(size=(3, 4, 4)) + 4 * np.eye(4), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    np.testing.assert_allclose(jax.jit(jax.vmap(solvers.unbatched_solve))(systems, rhs),
                               jnp.linalg.solve(systems, rhs[..., None])[..., 0], rtol=1e-5, atol=1e-6)
    shared = jax.vmap(solvers.unbatched_solve, in_axes=(None, 0))(systems[0], rhs)  # unbatched matrix
    np.testing.assert_allclose(shared, jnp.linalg.solve(systems[0], rhs.T).T, rtol=1e-5, atol=1e-6)


def _degenerate_gramians(num):
    """Identical task gradients, and one task with a zero gradient (normalised, ridged)."""
    rng = np.random.default_rng(num)
    g = rng.normal(size=(1, 6))
    jac_zero = rng.normal(size=(num, 6))
    jac_zero[-1] = 0.0
    return [normalized_gramian(jnp.asarray(j @ j.T, jnp.float32))[0] for j in (np.repeat(g, num, 0), jac_zero)]


@pytest.mark.parametrize("num,dim", [(2, 5), (3, 2), (4, 3), (4, 9)])
def test_small_k_exact_solves_match_the_iterative_solvers(num, dim, monkeypatch):
    """For K <= EXACT_MAX_TASKS the min-norm and dual-cone problems enumerate every active set; the
    result is feasible, finite and no worse than the projected-gradient path (forced by setting
    EXACT_MAX_TASKS = 0), also on identical and zero task gradients."""
    assert num <= solvers.EXACT_MAX_TASKS
    gramians = [random_gramian(num, dim, seed=11 * num + dim)[0], *_degenerate_gramians(num)]
    targets = jnp.asarray(np.concatenate([np.eye(num) / num, np.full((1, num), 1.0 / num)]), jnp.float32)

    def solvers_jitted():  # fresh lambdas: jit traces again after the monkeypatch; one compile per path
        return (jax.jit(lambda g: solvers.min_norm_on_simplex(g)),
                jax.jit(lambda g, u: solvers.project_to_dual_cone(g, u)))

    @jax.jit
    def some_active_set_feasible(g):  # then the exact path, not its fallback, gave the exact results
        min_norm = jax.vmap(lambda s: solvers._min_norm_kkt(g, s)[1])(solvers._subsets(num, nonempty=True))
        dual_cone = jax.vmap(lambda u: jax.vmap(lambda f: solvers._dual_cone_kkt(g, u, f)[1])(
            solvers._subsets(num, nonempty=False)))(targets)
        return min_norm.any(), dual_cone.any(axis=1)

    min_norm, dual_cone = solvers_jitted()
    exact = [(min_norm(g), dual_cone(g, targets)) for g in gramians]
    with monkeypatch.context() as patch:  # traced (on first call) with the exact path switched off
        patch.setattr(solvers, "EXACT_MAX_TASKS", 0)
        min_norm, dual_cone = solvers_jitted()
        iterative = [(min_norm(g), dual_cone(g, targets)) for g in gramians]
    for gramian, (w_exact, v_exact), (w_iter, v_iter) in zip(gramians, exact, iterative):
        min_norm_feasible, dual_cone_feasible = some_active_set_feasible(gramian)
        assert bool(min_norm_feasible) and bool(dual_cone_feasible.all())
        g64 = np.asarray(gramian, np.float64)
        w_exact, w_iter = np.asarray(w_exact, np.float64), np.asarray(w_iter, np.float64)
        assert np.all(np.isfinite(w_exact)) and w_exact.min() >= 0 and abs(w_exact.sum() - 1) < 1e-5
        assert w_exact @ g64 @ w_exact <= w_iter @ g64 @ w_iter + 1e-6
        for u, ve, vi in zip(np.asarray(targets, np.float64), np.asarray(v_exact, np.float64),
                             np.asarray(v_iter, np.float64)):
            assert np.all(np.isfinite(ve)) and np.all(ve >= u - 1e-6)
            assert ve @ g64 @ ve <= vi @ g64 @ vi * (1 + 1e-5) + 1e-9



def test_small_solve_matches_lapack_and_flags_singular_systems():
    """The unrolled pivoting elimination of the small-K paths against float64 LAPACK, on random
    systems (including ones whose first pivot is zero) and vmapped; a singular system is non-finite."""
    rng = np.random.default_rng(2)
    for num in (1, 2, 3, 5):
        a = rng.normal(size=(16, num, num)).astype(np.float32)
        if num > 1:
            a[:8, 0, 0] = 0.0  # row exchanges needed
        b = rng.normal(size=(16, num)).astype(np.float32)
        x = np.asarray(jax.jit(jax.vmap(solvers.small_solve))(jnp.asarray(a), jnp.asarray(b)))
        reference = np.linalg.solve(a.astype(np.float64), b.astype(np.float64)[..., None])[..., 0]
        residual = np.abs(np.einsum("bij,bj->bi", a.astype(np.float64), x) - b).max(axis=1)
        assert np.all(residual <= 1e-4 * (1 + np.abs(a).max(axis=(1, 2)) * np.abs(reference).max(axis=1))), num
    assert not np.all(np.isfinite(np.asarray(solvers.small_solve(jnp.ones((3, 3)), jnp.ones(3)))))


def test_two_task_segment_search_finds_interior_and_end_minima():
    """CAGrad's two-task dual runs a nested grid search on the segment: on quadratics with the
    minimiser at an interior t, at t = 0 and at t = 1 it lands within 1e-6 of the closed form."""
    for target in (0.3137, -0.5, 1.7):
        objective = lambda w, c=target: (w[0] - c) ** 2 + 0.1 * (w[1] - 1.0 + c) ** 2
        w = np.asarray(jax.jit(lambda: solvers.minimize_on_simplex(objective, 2))())
        assert abs(w.sum() - 1.0) < 1e-6 and abs(w[0] - np.clip(target, 0.0, 1.0)) < 1e-6, (target, w)
