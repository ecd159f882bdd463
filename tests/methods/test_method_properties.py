"""Closed forms, defining properties and error messages of the MTL methods."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.train.methods import METHODS, MethodInputs, get_method, returns_direction

NEEDS_PARAMS = {"moco": 5, "excess_mtl": 5}
def _reads_gramian(method):
    return method.needs == "gramian" or "last_shared_gramian" in method.wants  # GradNorm: a Gramian's diagonal


GRAMIAN_METHODS = sorted(
    n for n in METHODS
    if _reads_gramian(get_method(n, **({"num_params": NEEDS_PARAMS[n]} if n in NEEDS_PARAMS else {})))
)


@functools.lru_cache(maxsize=None)
def _build(name, items):
    return get_method(name, **dict(items))


def build(name, **hparams):
    """The method (cached, so its jitted update compiles once per shape)."""
    if name in NEEDS_PARAMS:
        hparams.setdefault("num_params", NEEDS_PARAMS[name])
    return _build(name, tuple(sorted(hparams.items())))


_JITTED = {}


def call(method, jac=None, losses=None, state=None, step=0, seed=0, **extra):
    """One jitted update (compiled once per method and shapes); returns (out, state)."""
    jac = None if jac is None else jnp.asarray(jac, jnp.float32)
    num = jac.shape[0] if jac is not None else len(losses)
    losses = jnp.ones((num,), jnp.float32) if losses is None else jnp.asarray(losses, jnp.float32)
    state = method.init(num) if state is None else state
    inputs = MethodInputs(
        losses=losses,
        step=jnp.int32(step),
        gramian=None if jac is None else jac @ jac.T,
        jacobian=jac if method.needs == "jacobian" else None,
        **extra,
    )
    update = _JITTED.setdefault(id(method), jax.jit(method.update))
    return update(inputs, state, jax.random.key(seed))


def conflicting_jacobian(num, dim, seed):
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(num, dim))
    jac[1] = -0.8 * jac[0] + 0.3 * rng.normal(size=dim)
    return jac.astype(np.float32)


# ------------------------------------------------------------------------------------ registry


def test_every_method_builds_and_returns_finite_output():
    rng = np.random.default_rng(0)
    jac = rng.normal(size=(3, 5)).astype(np.float32)
    for name in METHODS:
        method = build(name)
        out, _ = call(method, jac=jac if method.needs != "losses" or method.wants else None, losses=[1.0, 2.0, 0.5])
        assert out.shape == ((5,) if returns_direction(method) else (3,)), name
        assert np.all(np.isfinite(out)), name


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names.*cagrad.*nash_mtl"):
        get_method("nashmtl")


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'calpha'.*valid.*'c'"):
        get_method("cagrad", calpha=0.4)


def test_missing_required_hyperparameter():
    with pytest.raises(ValueError, match=r"'chain' needs hyperparameter\(s\) \['weighting', 'aggregator'\]"):
        get_method("chain")
    for name in ("moco", "excess_mtl"):  # per-parameter state: P is an init argument (the trainer binds it)
        with pytest.raises(ValueError, match=f"{name} keeps per-parameter state.*num_params"):
            get_method(name).init(2)


@pytest.mark.parametrize("name", GRAMIAN_METHODS + ["graddrop", "moco"])
def test_single_task_with_gradient_method_errors(name):
    with pytest.raises(ValueError, match="at least 2 tasks"):
        build(name, num_tasks=1)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        build(name).init(1)


# --------------------------------------------------------------------------------- closed forms


def test_mgda_two_tasks_is_min_norm_point_of_segment():
    rng = np.random.default_rng(1)
    for _ in range(5):
        g1, g2 = rng.normal(size=(2, 4))
        g2 = g2 - 0.5 * g1 if rng.uniform() < 0.5 else g2
        gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0.0, 1.0)
        expected = gamma * g1 + (1 - gamma) * g2
        w, _ = call(build("mgda"), jac=np.stack([g1, g2]))
        np.testing.assert_allclose(np.asarray(w) @ np.stack([g1, g2]), expected, atol=1e-5)


def test_pcgrad_conflicting_pair_by_hand():
    jac = np.array([[1.0, 0.0], [-1.0, 1.0]])
    # g1.g2 = -1: g1' = g1 + g2 / 2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1); sum = (0.5, 1.5).
    w, _ = call(build("pcgrad"), jac=jac)
    np.testing.assert_allclose(np.asarray(w), [2.0, 1.5], atol=1e-6)
    np.testing.assert_allclose(np.asarray(w) @ jac, [0.5, 1.5], atol=1e-6)
    w, _ = call(build("pcgrad"), jac=np.array([[1.0, 0.0], [1.0, 1.0]]))  # no conflict: plain sum
    np.testing.assert_allclose(np.asarray(w), [1.0, 1.0])


def test_pcgrad_result_does_not_conflict_for_two_tasks():
    jac = conflicting_jacobian(2, 6, seed=3)
    w, _ = call(build("pcgrad"), jac=jac)
    assert np.all(jac @ (np.asarray(w) @ jac) >= -1e-5)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("num,dim", [(2, 3), (5, 10), (8, 40)])
def test_dual_cone_methods_do_not_conflict(name, num, dim):
    for seed in range(3):
        jac = conflicting_jacobian(num, dim, seed)
        assert np.min(jac @ jac.T) < 0
        # With the ridge reg_eps I on the trace-normalised Gramian, KKT gives (G + reg_eps tr(G) I) v
        # >= 0, i.e. g_k . d >= -reg_eps tr(G) v_k: exactly non-conflicting up to that ridge.
        w, _ = call(build(name), jac=jac)
        w = np.asarray(w, np.float64)
        products = jac @ (w @ jac)
        slack = 1e-4 * np.trace(jac @ jac.T) * np.abs(w) * 1.01 + 1e-5 * np.abs(products).max()
        assert np.all(products >= -slack), (name, products, slack)
        w, _ = call(build(name, reg_eps=1e-7), jac=jac)
        products = jac @ (np.asarray(w, np.float64) @ jac)
        assert np.all(products >= -2e-4 * np.abs(products).max()), (name, products)


def test_upgrad_dualproj_keep_mean_when_no_conflict():
    jac = np.array([[1.0, 0.2, 0.0], [0.8, 0.0, 0.3]])
    for name, expected in [("dualproj", [0.5, 0.5]), ("upgrad", [0.5, 0.5])]:
        w, _ = call(build(name), jac=jac)
        np.testing.assert_allclose(np.asarray(w), expected, atol=1e-4)


def test_cagrad_with_c_zero_is_mean():
    jac = conflicting_jacobian(4, 9, seed=0)
    w, _ = call(build("cagrad", c=0.0), jac=jac)
    np.testing.assert_allclose(np.asarray(w), np.full(4, 0.25), atol=1e-6)


def test_cagrad_improves_worst_task_over_mean():
    jac = conflicting_jacobian(3, 9, seed=2)
    w, _ = call(build("cagrad"), jac=jac)
    mean = jac.mean(0)
    direction = np.asarray(w) @ jac
    assert np.min(jac @ direction) >= np.min(jac @ mean) - 1e-6


def test_imtl_g_equal_projections():
    for num, dim in [(2, 4), (4, 10), (6, 30)]:
        jac = conflicting_jacobian(num, dim, seed=num)
        w, _ = call(build("imtl_g"), jac=jac)
        direction = np.asarray(w, np.float64) @ jac
        projections = jac @ direction / np.linalg.norm(jac, axis=1)
        np.testing.assert_allclose(projections, projections.mean(), rtol=1e-3)
        assert abs(np.sum(w) - 1) < 1e-5


def test_nash_mtl_solves_bargaining_condition_and_clips():
    jac = conflicting_jacobian(4, 12, seed=5) * 3.0
    gramian = jac.astype(np.float64) @ jac.T
    w, _ = call(build("nash_mtl", max_norm=0.0), jac=jac)
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(gramian @ w, 1.0 / w, rtol=5e-3)
    clipped, _ = call(build("nash_mtl"), jac=jac)  # max_norm=1: ||J^T a|| = sqrt(K) = 2 -> 1
    np.testing.assert_allclose(np.linalg.norm(np.asarray(clipped, np.float64) @ jac), 1.0, rtol=1e-3)


def test_fairgrad_solves_alpha_fair_condition():
    jac = conflicting_jacobian(3, 12, seed=6)
    gramian = jac.astype(np.float64) @ jac.T
    for alpha in (1.0, 2.0):
        w, _ = call(build("fairgrad", alpha=alpha), jac=jac)
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(gramian @ w, w ** (-1 / alpha), rtol=5e-3)


def test_aligned_mtl_gives_equal_orthogonal_components():
    jac = conflicting_jacobian(3, 8, seed=9)
    w, _ = call(build("aligned_mtl"), jac=jac)
    # J^T w = sqrt(lmin) sum of the orthonormalised gradients: projections on the singular basis
    # of J are all sqrt(lambda_min) (up to sign).
    u, s, vt = np.linalg.svd(jac.astype(np.float64), full_matrices=False)
    coords = vt @ (np.asarray(w, np.float64) @ jac)
    np.testing.assert_allclose(np.abs(coords), s.min() * np.abs(u.sum(0)), rtol=1e-3)


def test_config_direction_has_equal_cosines():
    jac = conflicting_jacobian(3, 10, seed=4)
    w, _ = call(build("config"), jac=jac)
    direction = np.asarray(w, np.float64) @ jac
    cosines = jac @ direction / np.linalg.norm(jac, axis=1) / np.linalg.norm(direction)
    np.testing.assert_allclose(cosines, cosines.mean(), rtol=1e-3)
    assert cosines.min() > 0
    np.testing.assert_allclose(
        np.linalg.norm(direction), np.sum(jac @ direction) / np.linalg.norm(direction), rtol=1e-4
    )


def test_sdmgrad_and_modo_weights_on_simplex_and_respond_to_cross_gramian():
    jac = conflicting_jacobian(3, 10, seed=8)
    for name in ("sdmgrad", "modo"):
        w, state = call(build(name), jac=jac)
        assert abs(float(np.sum(w)) - 1) < 1e-5 and np.all(np.asarray(w) >= 0)
        other = conflicting_jacobian(3, 10, seed=9)
        cross = jnp.asarray(jac @ other.T)
        w2, _ = call(build(name), jac=jac, cross_gramian=cross)
        assert not np.allclose(w, w2)


def test_gradvac_without_conflict_and_zero_target_is_sum():
    jac = np.array([[1.0, 0.2], [0.5, 1.0]])
    w, state = call(build("gradvac"), jac=jac)
    np.testing.assert_allclose(np.asarray(w), [1.0, 1.0], atol=1e-6)
    cos = 0.7 / (np.linalg.norm(jac[0]) * np.linalg.norm(jac[1]))
    np.testing.assert_allclose(np.asarray(state.target_cos), [[0, cos / 2], [cos / 2, 0]], atol=1e-5)


# ----------------------------------------------------------------------------- loss weighting


def test_famo_weights_and_logit_step_by_hand():
    method = build("famo", extra_forward=False)  # the lagged variant: the step happens in ``update``
    w, state = call(method, losses=[1.0, 2.0])
    # z = (1/2, 1/2), c = sum z / L = 0.75, w = z / (c L) = (2/3, 1/3).
    np.testing.assert_allclose(np.asarray(w), [2 / 3, 1 / 3], rtol=1e-5)
    new_losses = np.array([0.5, 1.9])
    w, state = call(method, losses=new_losses, state=state, step=1)
    delta = np.log([1.0, 2.0]) - np.log(new_losses)
    grad = 0.5 * (delta - delta.mean())  # softmax VJP at uniform z
    logits = -0.025 * np.sign(grad)  # first Adam step: lr * m_hat / sqrt(v_hat)
    np.testing.assert_allclose(np.asarray(state.logits), logits, rtol=1e-4)
    z = np.exp(logits) / np.exp(logits).sum()
    expected = z / (np.sum(z / new_losses) * new_losses)
    np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-4)
    # The paper's variant: ``update`` leaves the logits alone, ``after_update`` steps them with
    # delta = log L_t(theta_t) - log L_t(theta_{t+1}).
    paper = build("famo")
    assert method.after_update is None and paper.after_update is not None
    _, state2 = call(paper, losses=new_losses, state=call(paper, losses=[1.0, 2.0])[1], step=1)
    np.testing.assert_allclose(np.asarray(state2.logits), 0.0)
    inputs = MethodInputs(losses=jnp.asarray([1.0, 2.0]), step=jnp.int32(0), updated_losses=jnp.asarray([2.0, 1.0]))
    state3 = paper.after_update(inputs, state2)
    assert np.asarray(state3.logits)[0] > 0 > np.asarray(state3.logits)[1]


def test_gradnorm_moves_weights_toward_balanced_rates():
    method = build("gradnorm")
    jac = np.eye(2, dtype=np.float32)  # equal gradient norms
    state = method.init(2)
    update = jax.jit(method.update)
    for step in range(30):
        losses = jnp.asarray([0.97**step, 1.0], jnp.float32)  # task 0 trains faster
        w, state = update(
            MethodInputs(losses=losses, step=jnp.int32(step), gramian=jnp.asarray(jac @ jac.T)),
            state,
            jax.random.key(0),
        )
    assert w[1] > w[0] and abs(float(w.sum()) - 2) < 1e-5


def test_uw_and_imtl_l_converge_to_inverse_loss_scale():
    losses = [0.5, 4.0]
    for name, expected in (("uw", 0.5 / np.array(losses)), ("imtl_l", 1 / np.array(losses))):
        method = build(name, lr=0.05)
        state = method.init(2)
        update = jax.jit(method.update)
        for step in range(400):
            w, state = update(MethodInputs(losses=jnp.asarray(losses), step=jnp.int32(step)), state, jax.random.key(0))
        np.testing.assert_allclose(np.asarray(w), expected, rtol=0.05)


def test_dwa_gls_stch_rlw_closed_forms():
    method = build("dwa", steps_per_epoch=1)
    state = method.init(2)
    for step, losses in enumerate([[1.0, 1.0], [0.5, 1.0], [0.25, 1.0]]):
        w, state = call(method, losses=losses, state=state, step=step)
    ratio = np.array([0.5, 1.0])  # L(e-1) / L(e-2) at the third update
    np.testing.assert_allclose(np.asarray(w), 2 * np.exp(ratio / 2) / np.exp(ratio / 2).sum(), rtol=1e-5)
    w, _ = call(build("gls"), losses=[1.0, 4.0])
    np.testing.assert_allclose(np.asarray(w), [2.0 / 2, 2.0 / 8], rtol=1e-5)
    method = build("stch", warmup_steps=1)
    w, state = call(method, losses=[2.0, 4.0])
    np.testing.assert_allclose(np.asarray(w), [0.5, 0.25], rtol=1e-6)
    w, _ = call(method, losses=[1.0, 4.0], state=state, step=1)
    soft = np.array([0.5, 1.0]) / 1.5  # softmax(log(L / nadir)) = (L / nadir) / sum
    np.testing.assert_allclose(np.asarray(w), 2 * soft / np.array([1.0, 4.0]), rtol=1e-5)
    w, _ = call(build("rlw"), losses=[1.0, 1.0, 1.0])
    assert abs(float(w.sum()) - 1) < 1e-6 and np.all(np.asarray(w) > 0)


def test_db_mtl_balances_log_gradient_norms():
    jac = np.array([[3.0, 0.0], [0.0, 1.0]])
    losses = np.array([1.0, 2.0])
    w, _ = call(build("db_mtl"), jac=jac, losses=losses)
    scaled_norms = np.abs(np.asarray(w)) * np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(scaled_norms, scaled_norms.max(), rtol=1e-5)
    np.testing.assert_allclose(scaled_norms.max(), 3.0, rtol=1e-5)


# ----------------------------------------------------------------------- Jacobian methods


def test_graddrop_keeps_agreeing_signs_and_drops_one_side():
    jac = np.array([[1.0, -2.0, 3.0], [2.0, -1.0, -3.0]])
    d, _ = call(build("graddrop"), jac=jac)
    d = np.asarray(d)
    np.testing.assert_allclose(d[:2], [3.0, -3.0], atol=1e-6)  # same signs: all kept
    assert d[2] in (3.0, -3.0)  # pure conflict: one sign survives


def test_graddrop_keeps_the_positive_side_with_probability_of_its_sign_purity():
    """Eqs. 1-3 of Chen et al. 2020: with g = (1, -1/3) at a coordinate, P = (1 + (2/3) / (4/3)) / 2
    = 3/4, so the positive gradient survives (d = 1) with probability 3/4 and the negative one
    (d = -1/3) otherwise, independently per coordinate."""
    jac = np.tile(np.array([[1.0], [-1.0 / 3.0]]), (1, 20000))
    d = np.asarray(call(build("graddrop"), jac=jac)[0])
    assert np.all(np.isclose(d, 1.0) | np.isclose(d, -1.0 / 3.0))
    assert abs(np.mean(np.isclose(d, 1.0)) - 0.75) < 0.015  # 5 standard errors


def test_moco_tracks_normalised_gradients():
    jac = np.array([[3.0, 0.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0, 0.0]])
    method = build("moco")
    d, state = call(method, jac=jac, losses=[1.0, 2.0])
    # t = 1: Y = beta * L_k g_k / ||g_k|| = 0.5 * diag(1, 2); lambda = softmax(1/2 - 0.1 Y Y^T 1/2).
    tracked = np.array([[0.5, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(state.tracked), tracked, atol=1e-6)
    logits = 0.5 - 0.1 * (tracked @ tracked.T) @ np.array([0.5, 0.5])
    lam = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(np.asarray(d), lam @ tracked, rtol=1e-5)


def test_excess_mtl_upweights_task_with_larger_excess_risk():
    method = build("excess_mtl", num_params=4, robust_step_size=0.5)
    state = method.init(2)
    rng = np.random.default_rng(0)
    for step in range(5):
        jac = np.stack([rng.normal(size=4) * 0.1, rng.normal(size=4) * (1 + step)]).astype(np.float32)
        w, state = call(method, jac=jac, state=state, step=step)
    assert w[1] > w[0] and abs(float(w.sum()) - 2) < 1e-5


# ----------------------------------------------------------------------- degenerate Gramians


DEGENERATE = {
    "zero_task": np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]),
    "identical": np.array([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]]),
    "opposite": np.array([[1.0, 2.0, 0.5], [-1.0, -2.0, -0.5]]),
    "all_zero": np.zeros((2, 3)),
    # K = 6 > 4: the iterative solvers (projected gradient, Newton), not the exact active-set path
    "k6_mixed": np.array([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [-1.0, -2.0, -0.5], [0.0, 0.0, 0.0],
                          [0.0, 1.0, -1.0], [0.0, 2.0, -2.0]]),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_gramians_give_finite_results(case):
    jac = DEGENERATE[case]
    for name in GRAMIAN_METHODS + ["graddrop", "moco", "excess_mtl"]:
        method = build(name, num_params=3) if name in NEEDS_PARAMS else build(name)
        losses = np.linspace(1.0, 0.5, len(jac))
        out, state = call(method, jac=jac, losses=losses)
        out2, _ = call(method, jac=jac, losses=losses, state=state, step=1)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(out2)), (name, case, out, out2)
