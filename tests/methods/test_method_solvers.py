"""On-device K x K solvers against exact float64 references, on ill-conditioned and rank-deficient
Gramians, for K in {2, 3, 5, 10, 40, 64}.

Every solver sees float32 data; the checks run in float64 on that same data (the float32 Gramian
read exactly). Tolerances are 1e-6 relative; "rounding scale" below is the float32 resolution a
solution can have at all: for a row, ``sqrt(G_jj) sum_i |x_i| sqrt(G_ii)`` (the bound on
``|(G x)_j|`` that rounding errors scale with), for an objective ``(sum_i |x_i| sqrt(G_ii))^2``.
Relative errors of an objective are taken against ``max(f*, 1e-1 * rounding scale)``, so a zero
optimum (0 in the convex hull, opposite gradients) is checked to 1e-7 of its rounding scale.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import least_squares, minimize, nnls

from mtl_jax.train.methods import solvers

SIZES = [2, 3, 5, 10, 40, 64]
KINDS = ["random", "norms", "rank", "rank_norms", "conflict", "zero"]
ALPHAS = (1.0, 2.0, 0.5)
TOL = 1e-6
EPS = 1e-8  # CAGrad's epsilon under the square root


def jacobian(kind, num, seed):
    """[K, P] float64 task gradients (P = 2K + 3), normalised to unit mean squared norm.

    'random': Gaussian, one gradient flipped. 'norms': unit directions times norms log-spaced over
    1e-2 .. 1e2 (four orders of magnitude), shuffled. 'rank': rank ~K/3 around a shared direction,
    with a duplicated gradient (0 not in the hull). 'rank_norms': 'rank' with the norms of
    'norms'. 'conflict': rank ~K/3 with a duplicated and an opposite gradient (0 in the hull, a
    zero min-norm point). 'zero': 'random' with one zero gradient."""
    rng = np.random.default_rng(seed)
    dim = 2 * num + 3
    if kind in ("rank", "rank_norms", "conflict"):
        rank = max(1, num // 3)
        jac = rng.normal(size=(num, rank)) @ rng.normal(size=(rank, dim))
        if kind == "conflict":
            jac[-1] = -jac[0]
        else:
            jac += 2.0 * np.sqrt(rank) * rng.normal(size=dim)
        if num >= 3:
            jac[1] = jac[0]
    else:
        jac = rng.normal(size=(num, dim))
        jac[0] *= -1.0
    if kind.endswith("norms"):
        jac /= np.linalg.norm(jac, axis=1, keepdims=True)
        jac *= rng.permutation(np.logspace(-2, 2, num))[:, None]
    if kind == "zero":
        jac[-1] = 0.0
    return jac / np.sqrt(np.mean(np.sum(jac**2, axis=1)))


def as_f32(matrix):
    """(float32 device array, the same values in float64)."""
    matrix32 = np.asarray(matrix, np.float32)
    return jnp.asarray(matrix32), matrix32.astype(np.float64)


def root_diag(g):
    return np.sqrt(np.maximum(np.diag(g), 0.0))


MIN_NORM = jax.jit(solvers.min_norm_on_simplex)  # module level: one compile per shape
CAGRAD = jax.jit(lambda g, b, r: solvers.cagrad_dual(g, b, r, EPS))
PROJECT = jax.jit(solvers.project_to_dual_cone)
BARGAIN = jax.jit(solvers.solve_power_bargaining, static_argnums=1)


@functools.lru_cache(maxsize=None)
def problems(num):
    """Per kind, the float32 data of every solver's problem at K = ``num`` and the solutions."""
    jacs = [jacobian(kind, num, 97 * num + i) for i, kind in enumerate(KINDS)]
    mean = np.full(num, 1.0 / num)
    rng = np.random.default_rng(num)
    targets = np.concatenate([np.eye(num) / num, mean[None], rng.uniform(0, 1, (1, num))]).astype(np.float32)
    data = {"jac": jacs, "targets": targets, "gram": [as_f32(j @ j.T) for j in jacs]}
    # UPGrad / DualProj's trace-normalised Gramian with TorchJD's ridge, and without one.
    data["box"] = [[as_f32(j @ j.T / np.trace(j @ j.T) + reg * np.eye(num)) for j in jacs] for reg in (1e-4, 0.0)]
    # Nash-MTL / FairGrad's task-relative ridge (aggregation._fair_weights).
    data["fair"] = [as_f32(j @ j.T + 1e-4 * np.diag(np.maximum(np.diag(j @ j.T), 1e-2))) for j in jacs]
    data["cagrad"] = [((g @ mean).astype(np.float32), np.float32(0.5 * np.sqrt(mean @ g @ mean + EPS)))
                      for _, g in data["gram"]]
    f64 = lambda x: np.asarray(x, np.float64)
    data["mgda"] = [f64(MIN_NORM(g)) for g, _ in data["gram"]]
    data["cagrad_w"] = [f64(CAGRAD(g, b, r)) for (g, _), (b, r) in zip(data["gram"], data["cagrad"])]
    data["box_v"] = [[f64(PROJECT(g, targets)) for g, _ in pairs] for pairs in data["box"]]
    alphas = ALPHAS if num in (5, 64) else ALPHAS[:1]  # alpha is static: one compile each
    data["fair_w"] = {a: [f64(BARGAIN(g, a)) for g, _ in data["fair"]] for a in alphas}
    return data


def simplex_kkt(w, grad, scale):
    """Largest scaled violation of the simplex KKT conditions at ``w``: multipliers
    ``mu_j = grad_j - w^T grad`` must be >= 0, and 0 where ``w_j > 0``; ``scale`` [K] is the
    rounding scale of ``grad``, plus that of ``w^T grad``."""
    scaled = (grad - w @ grad) / (scale + w @ scale + 1e-300)
    return max(np.max(-scaled), np.max(np.abs(scaled[w > 0])))


def min_norm_kkt(g, w):
    return simplex_kkt(w, g @ w, root_diag(g) * (root_diag(g) @ w))


@pytest.mark.parametrize("num", SIZES)
def test_min_norm_on_simplex_is_exact(num):
    """MGDA: ``min_{w in simplex} w^T G w`` against NNLS on ``[J^T; 1^T] x = [0; 1]`` (``x / sum x``
    is the min-norm point: an exact reformulation, float64 Lawson-Hanson), KKT checked directly."""
    data = problems(num)
    for kind, jac, (_, g), w in zip(KINDS, data["jac"], data["gram"], data["mgda"]):
        assert w.min() >= 0 and abs(w.sum() - 1) <= TOL, kind
        w = w / w.sum()
        system = np.concatenate([jac.T, np.ones((1, num))])
        x, _ = nnls(system, np.eye(len(system))[-1], maxiter=100 * num)
        reference = x / x.sum()
        value, best = w @ g @ w, reference @ g @ reference
        assert value <= best + TOL * max(best, 0.1 * (root_diag(g) @ w) ** 2), (kind, value, best)
        assert min_norm_kkt(g, w) <= TOL, kind


@pytest.mark.parametrize("num", SIZES)
def test_dual_cone_projection_is_exact(num):
    """UPGrad / DualProj: ``min_{v >= u} v^T G v`` for the K targets ``e_i / K``, the mean and a
    random one, on G trace-normalised with TorchJD's ridge 1e-4 and without a ridge, against NNLS
    on ``min_{z >= 0} ||A (u + z)||`` (``A^T A = G``, float64), KKT checked directly: ``v >= u``,
    multipliers ``(G v)_j >= 0``, and 0 where ``v_j > u_j``."""
    data = problems(num)
    targets = data["targets"].astype(np.float64)
    for reg, pairs, solutions in zip((1e-4, 0.0), data["box"], data["box_v"]):
        for kind, jac, (_, g), values in zip(KINDS, data["jac"], pairs, solutions):
            system = np.concatenate([jac.T / np.linalg.norm(jac), np.sqrt(reg) * np.eye(num)])
            for u, v in zip(targets, values):
                assert np.all(v >= u), (reg, kind)
                z, _ = nnls(system, -system @ u, maxiter=100 * num)
                value, best = v @ g @ v, (u + z) @ g @ (u + z)
                assert value <= best + TOL * max(best, 0.1 * (root_diag(g) @ v) ** 2), (reg, kind, value, best)
                scaled = (g @ v) / (root_diag(g) * (root_diag(g) @ v) + 1e-300)
                assert max(np.max(-scaled), np.max(np.abs(scaled[v > u]), initial=0.0)) <= TOL, (reg, kind)


@pytest.mark.parametrize("num", SIZES)
def test_cagrad_dual_is_exact(num):
    """CAGrad: ``min_{w in simplex} b^T w + rho sqrt(w^T G w + eps)``: the KKT conditions checked
    directly (they certify the minimum of this convex problem), and no lower value found by SLSQP
    (float64, 100 iterations from the uniform point and from our solution)."""
    data = problems(num)
    for kind, (_, g), (b, rho), w in zip(KINDS, data["gram"], data["cagrad"], data["cagrad_w"]):
        b, rho = b.astype(np.float64), float(rho)
        assert w.min() >= 0 and abs(w.sum() - 1) <= TOL, kind
        w = w / w.sum()
        dual = lambda x: b @ x + rho * np.sqrt(max(x @ g @ x, 0.0) + EPS)
        grad = lambda x: b + rho * (g @ x) / np.sqrt(max(x @ g @ x, 0.0) + EPS)
        simplex = ({"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones(num)},)
        best = min(minimize(dual, x0, jac=grad, method="SLSQP", bounds=[(0.0, 1.0)] * num, constraints=simplex,
                            options={"ftol": 1e-15, "maxiter": 100}).fun for x0 in (np.full(num, 1.0 / num), w))
        size = np.abs(b) @ w + rho * np.sqrt((root_diag(g) @ w) ** 2 + EPS)
        assert dual(w) <= best + TOL * max(abs(best), 0.1 * size), (kind, dual(w), best)
        # the multipliers' rounding scale: |b| bound plus rho |G||w| / ||g_w||
        norm = np.sqrt(max(w @ g @ w, 0.0) + EPS)
        scale = root_diag(g) * root_diag(g).mean() + np.abs(b) + rho * root_diag(g) * (root_diag(g) @ w) / norm
        assert simplex_kkt(w, grad(w), scale) <= TOL, kind


@pytest.mark.parametrize("num", SIZES)
def test_power_bargaining_converges(num):
    """Nash-MTL / FairGrad: ``G w = w^(-1/alpha)`` for alpha = 1 (and 2, 1/2 at K = 5, 64). The backward residual
    ``|G w - w^(-1/alpha)|_j / ((|G| w)_j + w_j^(-1/alpha))`` is <= 1e-6 on every case (float32's
    resolution: it bounds the relative residual ``|w^(1/alpha) (G w)_j - 1|`` times the cancellation
    ``((|G| w)_j + w_j^(-1/alpha)) / w_j^(-1/alpha)`` in G w, ~1 without conflicts, 1e4 with
    opposite gradients and the 1e-4 ridge, ~1-10 on random ones); on the random case w matches scipy
    ``least_squares`` (FairGrad's reference solver) to 1e-5."""
    data = problems(num)
    for alpha, solutions in data["fair_w"].items():
        for kind, (_, g), w in zip(KINDS, data["fair"], solutions):
            assert np.all(w > 0), (alpha, kind)
            rhs = w ** (-1.0 / alpha)
            error = np.abs(g @ w - rhs)
            assert np.max(error / (np.abs(g) @ w + rhs)) <= TOL, (alpha, kind)
            if kind == "random":
                reference = least_squares(lambda x: g @ x - x ** (-1.0 / alpha), w, bounds=(1e-12, np.inf),
                                          xtol=1e-15, ftol=1e-15, gtol=1e-15).x
                np.testing.assert_allclose(w, reference, rtol=1e-5)


def test_active_set_handles_rank_deficiency_without_ridge():
    """Identical, opposite and zero gradients with no ridge at all: the min-norm point and the
    dual-cone projection stay finite and exact (0 in the hull gives weights with ``J^T w = 0``)."""
    g = np.array([1.0, 2.0, 0.5])
    cases = {
        "identical": np.stack([g, g, g]), "opposite": np.stack([g, -g, g]), "zero": np.stack([g, 0 * g, 2 * g]),
        "segment": np.stack([g, 2 * g, 3 * g]),
    }
    min_norm = jax.jit(solvers.min_norm_on_simplex)
    project = jax.jit(jax.vmap(solvers.project_to_dual_cone, in_axes=(None, 0)))
    for name, jac in cases.items():
        gram, g64 = as_f32(jac @ jac.T)
        w = np.asarray(min_norm(gram), np.float64)
        assert np.all(np.isfinite(w)) and w.min() >= 0 and abs(w.sum() - 1) < 1e-6, name
        expected = {"identical": 5.25, "opposite": 0.0, "zero": 0.0, "segment": 5.25}[name]
        assert abs(w @ g64 @ w - expected) <= 1e-6 * max(expected, 1.0), (name, w @ g64 @ w)
        targets = np.concatenate([np.eye(3) / 3, np.full((1, 3), 1 / 3)]).astype(np.float32)
        v = np.asarray(project(gram, jnp.asarray(targets)), np.float64)
        assert np.all(np.isfinite(v)) and np.all(v >= targets), name
        assert np.all(g64 @ v.T >= -1e-6 * np.abs(g64) @ np.abs(v.T)), name


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


def test_methods_reach_the_exact_solutions():
    """Through the methods (the solvers' call sites): MGDA on gradients whose norms span four orders
    of magnitude returns the min-norm point of the raw hull (KKT to 1e-6), CAGrad's and Nash-MTL's
    weights satisfy their conditions on the raw Gramian."""
    from mtl_jax.train.methods import MethodInputs, get_method

    jac = np.asarray(jacobian("norms", 10, 3) * 7.0, np.float32)
    gram, g64 = as_f32(jac.astype(np.float64) @ jac.T.astype(np.float64))
    inputs = MethodInputs(losses=jnp.ones(10), step=jnp.int32(0), gramian=gram)

    def run(name, **hparams):
        method = get_method(name, num_tasks=10, **hparams)
        return np.asarray(jax.jit(method.update)(inputs, method.init(10), jax.random.key(0))[0], np.float64)

    w = run("mgda")
    assert abs(w.sum() - 1) < 1e-6 and min_norm_kkt(g64, w / w.sum()) <= TOL
    alpha = run("nash_mtl", max_norm=0.0, reg=0.0)
    assert np.max(np.abs(g64 @ alpha - 1 / alpha) / (np.abs(g64) @ alpha + 1 / alpha)) <= TOL


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
    update = jax.jit(lambda g: upgrad.update(MethodInputs(losses=jnp.ones(5), step=0, gramian=g), upgrad.init(5),
                                             jax.random.key(0))[0])
    calls = [line for line in update.lower(gram).as_text().splitlines() if re.search(r"custom_call @lapack_", line)]
    assert calls and all('num_batch_dims = "0"' in line for line in calls), calls
    systems = jnp.asarray(rng.normal(size=(3, 4, 4)) + 4 * np.eye(4), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    np.testing.assert_allclose(jax.jit(jax.vmap(solvers.unbatched_solve))(systems, rhs),
                               jnp.linalg.solve(systems, rhs[..., None])[..., 0], rtol=1e-5, atol=1e-6)
    shared = jax.vmap(solvers.unbatched_solve, in_axes=(None, 0))(systems[0], rhs)  # unbatched matrix
    np.testing.assert_allclose(shared, jnp.linalg.solve(systems[0], rhs.T).T, rtol=1e-5, atol=1e-6)
