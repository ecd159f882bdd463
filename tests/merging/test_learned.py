"""Learned-coefficient merging (AdaMerging, AdaMerging++, aTLAS, Self Positioning) and BOOM.

Real-data checks use scikit-learn's 8x8 digits: a 2-layer MLP trunk pretrained on the digit label,
then fine-tuned (trunk + a new head) on three other label maps (parity, mod 3, >= 5). Exact checks
use hand-built trees and linear objectives whose gradient w.r.t. the coefficients is known.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from mtl_jax.merging import (
    adamerging,
    apply_task_vector,
    atlas,
    boom,
    boom_update,
    coefficient_groups,
    default_layer_index,
    member_keys,
    multi_slerp,
    sample_indices,
    merge_with_coefficients,
    prediction_entropy,
    self_positioning,
    stacked_task_vectors,
    take_examples,
    task_arithmetic,
    ties_merge_vector,
    weight_average,
)
from mtl_jax.merging.learned import _task_vectors
from mtl_jax.merging.tree import replace_flat, select_flat

from .helpers import random_tree

# ------------------------------------------------------------------------------ digits setup

LABEL_MAPS = {  # every fine-tuned head has 3 outputs (unused ones learn to stay low)
    "parity": lambda y: y % 2,
    "mod3": lambda y: y % 3,
    "big": lambda y: (y >= 5).astype(y.dtype),
}


def trunk_apply(trunk, x):
    h = jax.nn.relu(x @ trunk["layers_0"]["kernel"] + trunk["layers_0"]["bias"])
    return jax.nn.relu(h @ trunk["layers_1"]["kernel"] + trunk["layers_1"]["bias"])


def head_apply(head, feats):
    return feats @ head["kernel"] + head["bias"]


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def init_head(rng, num_classes, width=32):
    return {"kernel": (rng.normal(size=(width, num_classes)) * 0.1).astype(np.float32),
            "bias": np.zeros((num_classes,), np.float32)}


def fit(params, loss_fn, steps, lr=1e-2):
    """Full-batch Adam on ``loss_fn(params)``: one jitted scan."""
    opt = optax.adam(lr)

    @jax.jit
    def run(params):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)[0][0]

    return run(params)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    return {"x_train": x[:1200], "y_train": y[:1200], "x_val": x[1200:1400], "y_val": y[1200:1400],
            "x_test": x[1400:], "y_test": y[1400:]}


@pytest.fixture(scope="module")
def mtl(digits):
    """(pretrained trunk, [fine-tuned trunks], {task: head}, digits)."""
    rng = np.random.default_rng(0)  # numpy init: no eager XLA compiles in the fixture
    trunk0 = {
        "layers_0": {"kernel": (rng.normal(size=(64, 32)) * 0.2).astype(np.float32), "bias": np.zeros((32,), np.float32)},
        "layers_1": {"kernel": (rng.normal(size=(32, 32)) * 0.2).astype(np.float32), "bias": np.zeros((32,), np.float32)},
    }
    x, y = jnp.asarray(digits["x_train"]), jnp.asarray(digits["y_train"])

    def pre_loss(p):
        return cross_entropy(head_apply(p["head"], trunk_apply(p["trunk"], x)), y)

    trunk0 = jax.tree_util.tree_map(np.asarray, fit({"trunk": trunk0, "head": init_head(rng, 10)}, pre_loss, 150)["trunk"])
    labels = np.stack([label_map(digits["y_train"]) for label_map in LABEL_MAPS.values()])

    def ft_loss(p):  # the three fine-tunings at once (vmapped over tasks), summed
        per_task = lambda q, yt: cross_entropy(head_apply(q["head"], trunk_apply(q["trunk"], x)), yt)
        return jnp.sum(jax.vmap(per_task)(p, labels))

    heads0 = jax.tree_util.tree_map(lambda *hs: np.stack(hs), *[init_head(rng, 3) for _ in LABEL_MAPS])
    stacked = fit({"trunk": jax.tree_util.tree_map(lambda a: np.stack([a] * 3), trunk0), "head": heads0}, ft_loss, 150)
    stacked = jax.tree_util.tree_map(np.asarray, stacked)
    finetuned = [jax.tree_util.tree_map(lambda a: a[i], stacked["trunk"]) for i in range(3)]
    heads = {t: jax.tree_util.tree_map(lambda a: a[i], stacked["head"]) for i, t in enumerate(LABEL_MAPS)}
    return trunk0, finetuned, heads, digits


def entropy_objective(heads, x):
    """Mean over tasks of the mean prediction entropy on unlabelled test inputs (AdaMerging)."""

    def objective(trunk, step_key):
        feats = trunk_apply(trunk, x)
        return jnp.mean(jnp.stack([jnp.mean(prediction_entropy(head_apply(h, feats))) for h in heads.values()]))

    return objective


def ce_objective(heads, x, y):
    """Sum over tasks of the labelled cross-entropy (aTLAS / Self Positioning)."""

    def objective(trunk, step_key):
        feats = trunk_apply(trunk, x)
        return sum(cross_entropy(head_apply(h, feats), LABEL_MAPS[t](y)) for t, h in heads.items())

    return objective


def mean_accuracy_array(trunk, heads, x, y):
    """Mean over tasks of the accuracy of each task's head on the merged trunk (jittable)."""
    feats = trunk_apply(trunk, jnp.asarray(x))
    return jnp.mean(jnp.stack([jnp.mean(jnp.argmax(head_apply(h, feats), -1) == LABEL_MAPS[t](jnp.asarray(y)))
                               for t, h in heads.items()]))


# -------------------------------------------------------------------------- real-data tests


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_on_digits_lowers_entropy_and_moves_coefficients(mtl, granularity):
    trunk0, fts, heads, d = mtl
    objective = entropy_objective(heads, jnp.asarray(d["x_test"]))
    res = adamerging(trunk0, fts, objective, granularity=granularity, lr=1e-2, steps=60,
                     layer_index=default_layer_index)
    shape = (3,) if granularity == "task" else (3, 2)  # layers_0 and layers_1 blocks
    assert res.coefficients.shape == shape
    assert res.history.shape == (60,)
    assert np.all((np.asarray(res.coefficients) >= 0) & (np.asarray(res.coefficients) <= 1))
    assert np.max(np.abs(np.asarray(res.coefficients) - 0.3)) > 0.1
    assert res.history[-1] < res.history[0] - 0.01
    evaluate = jax.jit(objective)
    final = float(evaluate(res.params, jax.random.key(0)))
    init = float(evaluate(task_arithmetic(trunk0, fts, 0.3), jax.random.key(0)))
    assert final < init and np.isclose(init, res.history[0], atol=1e-5)


def test_atlas_on_digits_learns_from_few_labels_and_keeps_best(mtl):
    trunk0, fts, heads, d = mtl
    # 5 labelled examples per digit from the validation split, as in aTLAS' few-shot setting.
    idx = np.concatenate([np.flatnonzero(d["y_val"] == c)[:5] for c in range(10)])
    objective = ce_objective(heads, jnp.asarray(d["x_val"][idx]), jnp.asarray(d["y_val"][idx]))

    accuracy = jax.jit(lambda trunk: mean_accuracy_array(trunk, heads, d["x_val"], d["y_val"]))
    validate = lambda trunk: float(accuracy(trunk))

    res = atlas(trunk0, fts, objective, lr=2e-2, steps=60, validate=validate, eval_every=20)
    assert res.coefficients.shape == (3, 4)  # one per (task, leaf)
    assert np.max(np.abs(np.asarray(res.coefficients))) > 0.1
    assert res.history[-1] < res.history[0] - 0.1
    assert validate(res.params) >= validate(trunk0)

    # Keep-best: a score that prefers the pretrained model returns the initial (zero) coefficients.
    distance = jax.jit(lambda trunk: sum(jnp.sum((a - b) ** 2) for a, b in zip(
        jax.tree_util.tree_leaves(trunk), jax.tree_util.tree_leaves(trunk0))))
    prefer_init = lambda trunk: -float(distance(trunk))
    kept = atlas(trunk0, fts, objective, lr=2e-2, steps=40, validate=prefer_init, eval_every=20)
    np.testing.assert_array_equal(np.asarray(kept.coefficients), 0.0)
    assert kept.history[-1] < kept.history[0]  # it did optimise, then kept the best-validated point
    jax.tree_util.tree_map(np.testing.assert_array_equal, kept.params, trunk0)


@pytest.mark.slow  # the SGD update itself is checked exactly in test_first_optimiser_steps_follow_the_hand_gradient
def test_self_positioning_on_digits_sgd_on_probe_set(mtl):
    trunk0, fts, heads, d = mtl
    x, y = jnp.asarray(d["x_val"]), jnp.asarray(d["y_val"])

    def probe_objective(trunk, step_key):  # a random half of the 200-example probe set per step
        idx = jax.random.choice(step_key, x.shape[0], (100,), replace=False)
        return ce_objective(heads, x[idx], y[idx])(trunk, step_key)

    res = self_positioning(trunk0, fts, probe_objective, lr=0.05, steps=80)
    assert res.coefficients.shape == (3,) and res.history.shape == (80,)
    assert np.max(np.abs(np.asarray(res.coefficients) - 1 / 3)) > 0.05
    # Minibatch losses are noisy; the loss on the whole probe set must fall from the average model.
    full = jax.jit(ce_objective(heads, x, y))
    assert full(res.params, None) < full(task_arithmetic(trunk0, fts, 1 / 3), None) - 0.03


# ------------------------------------------------------------------------------ exact checks


def _hand_problem(rng):
    p0 = random_tree(rng)
    fts = [jax.tree_util.tree_map(lambda a, e: a + e, p0, random_tree(rng, scale=0.1)) for _ in range(3)]
    weights = random_tree(rng)
    return p0, fts, weights


def _linear(weights):
    return lambda params, key: sum(jnp.sum(w * p) for w, p in zip(jax.tree_util.tree_leaves(weights),
                                                                 jax.tree_util.tree_leaves(params)))


def test_coefficient_gradient_matches_hand_computed_and_finite_difference(rng):
    p0, fts, weights = _hand_problem(rng)
    flat0 = select_flat(p0)
    tau = stacked_task_vectors([select_flat(f) for f in fts], flat0)
    flat_w = select_flat(weights)
    groups, g = coefficient_groups(list(flat0), "layer", default_layer_index)
    # embed (no block), block_0 (2 leaves), block_1 (2 leaves), block_2, heads kernel, heads bias
    assert g == 6 and groups["shared/block_0/Dense_0/kernel"] == groups["shared/block_0/Dense_0/bias"]
    coeffs = jnp.asarray(rng.uniform(0.1, 0.9, (3, g)), jnp.float32)

    def linear(c):
        merged = merge_with_coefficients(flat0, tau, c, groups)
        return sum(jnp.sum(flat_w[p] * merged[p]) for p in merged)

    # d/dc[t, g] sum_l <w_l, theta_0^l + sum_t c[t, g(l)] tau_t^l> = sum_{l in g} <w_l, tau_t^l>
    hand = np.zeros((3, g))
    for p, gid in groups.items():
        w = np.asarray(flat_w[p], np.float64)
        hand[:, gid] += np.tensordot(np.asarray(tau[p], np.float64), w, axes=w.ndim)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(linear))(coeffs)), hand, rtol=1e-4, atol=1e-4)

    def nonlinear(c):
        merged = merge_with_coefficients(flat0, tau, c, groups)
        return sum(jnp.sum(jnp.tanh(merged[p]) ** 2) for p in merged)

    value_and_grad = jax.jit(jax.value_and_grad(nonlinear))  # one compile for values and gradient
    grad = np.asarray(value_and_grad(coeffs)[1])
    eps = 1e-2
    for t, gid in [(0, 0), (1, 2), (2, 5)]:
        e = np.zeros(coeffs.shape, np.float32)
        e[t, gid] = eps
        fd = (float(value_and_grad(coeffs + e)[0]) - float(value_and_grad(coeffs - e)[0])) / (2 * eps)
        np.testing.assert_allclose(grad[t, gid], fd, rtol=2e-2, atol=1e-3)


def test_first_optimiser_steps_follow_the_hand_gradient(rng):
    p0, fts, weights = _hand_problem(rng)
    objective = _linear(weights)
    tau = stacked_task_vectors(fts, p0)
    grad = np.array([sum(float(jnp.sum(w * t[i])) for w, t in zip(jax.tree_util.tree_leaves(weights),
                                                                  jax.tree_util.tree_leaves(tau))) for i in range(3)])
    # Adam's first step is lr * g / (|g| + eps) = lr * sign(g). Coefficients are clamped to [0, 1]
    # in the merge and the clamp has zero gradient outside, so 1.5 and -0.5 act as 1 and 0 and stay.
    init = jnp.asarray([0.3, 1.5, -0.5])
    res = adamerging(p0, fts, objective, granularity="task", init=init, lr=0.05, steps=2)
    np.testing.assert_allclose(np.asarray(res.coefficients), [0.3 - 0.1 * np.sign(grad[0]), 1.0, 0.0], atol=1e-5)
    ta = jax.jit(task_arithmetic)
    np.testing.assert_allclose(res.history[0], float(objective(ta(p0, fts, jnp.asarray([0.3, 1.0, 0.0])), None)),
                               rtol=1e-5)
    # SGD (Self Positioning): c_1 = c_0 - lr * g.
    sp = self_positioning(p0, fts, objective, lr=1e-3, steps=1)
    np.testing.assert_allclose(np.asarray(sp.coefficients), 1 / 3 - 1e-3 * grad, rtol=1e-4, atol=1e-6)


def test_adamerging_plus_plus_uses_ties_trimmed_vectors(rng):
    p0, fts, weights = _hand_problem(rng)
    flat0, flat_fts = select_flat(p0), [select_flat(f) for f in fts]
    selected = _task_vectors(flat_fts, flat0, 0.2)  # the vectors adamerging(plus_plus=True) learns over

    @jax.jit
    def reference(flat_fts, flat0, selected):
        mean = jax.tree_util.tree_map(
            lambda s: jnp.sum(s, axis=0) / jnp.maximum(jnp.sum(s != 0, axis=0), 1), selected)
        kept = sum(jnp.sum(s != 0, axis=tuple(range(1, s.ndim))) for s in jax.tree_util.tree_leaves(selected))
        return mean, ties_merge_vector(stacked_task_vectors(flat_fts, flat0), 0.2), kept

    mean, ties, kept = reference(flat_fts, flat0, selected)
    # Agreement with TIES: the mean of the selected entries over tasks is the TIES merged vector.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), mean, ties)
    total = sum(x.size for x in jax.tree_util.tree_leaves(p0))
    assert np.all(np.asarray(kept) <= int(0.2 * total))  # at most the top 20% of each task survive
    assert np.all(np.asarray(kept) > 0)
    # With no steps, AdaMerging++ is theta_0 + 0.3 * sum_t selected_t (plain AdaMerging starts at
    # TA(0.3): checked on digits through history[0]).
    pp = adamerging(p0, fts, _linear(weights), plus_plus=True, steps=0)
    expected = replace_flat(p0, apply_task_vector(flat0, jax.tree_util.tree_map(lambda s: 0.3 * jnp.sum(s, axis=0), selected)))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), pp.params, expected)


def test_select_keeps_unselected_leaves_pretrained(rng):
    p0, fts, weights = _hand_problem(rng)
    res = atlas(p0, fts, _linear(weights), lr=0.05, steps=5, select="shared/.*")
    assert res.coefficients.shape == (3, 6)  # the six shared leaves, one coefficient each
    jax.tree_util.tree_map(np.testing.assert_array_equal, res.params["heads"], p0["heads"])
    assert not np.allclose(res.params["shared"]["embed"]["embedding"], p0["shared"]["embed"]["embedding"])


def test_per_leaf_task_arithmetic_and_errors(rng):
    p0, fts, weights = _hand_problem(rng)
    lam = jax.tree_util.tree_map(lambda _: jnp.asarray(rng.uniform(0, 1, 3), jnp.float32), p0)
    out = task_arithmetic(p0, fts, lam)
    ref = jax.tree_util.tree_map(
        lambda p, c, *fs: p + sum(c[i] * (f - p) for i, f in enumerate(fs)), p0, lam, *fts)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, ref)
    bad = dict(lam, heads={"cls": {"kernel": jnp.ones((2,)), "bias": jnp.ones((3,))}})
    with pytest.raises(ValueError, match=r"shape mismatch at 'heads/cls/kernel'.*\(3,\).*\(2,\)"):
        task_arithmetic(p0, fts, bad)
    with pytest.raises(ValueError, match=r"unknown granularity 'block'.*\['layer', 'task'\]"):
        adamerging(p0, fts, _linear(weights), granularity="block", steps=1)
    with pytest.raises(ValueError, match=r"no leaf selected by select='encoder/.\*'"):
        atlas(p0, fts, _linear(weights), steps=1, select="encoder/.*")
    with pytest.raises(ValueError, match=r"coefficient init has shape \(2,\); expected one of \[\(\), \(3,\)\]"):
        adamerging(p0, fts, _linear(weights), granularity="task", init=jnp.ones((2,)), steps=1)


# ------------------------------------------------------------------------------------- BOOM


def _logreg_train(steps=40, lr=0.5, batch=128):
    """Minibatch SGD on a softmax regression; the key picks the minibatches."""

    @jax.jit
    def train(params, data, key):
        def body(p, k):
            idx = jax.random.randint(k, (batch,), 0, data["x"].shape[0])
            g = jax.grad(lambda q: cross_entropy(data["x"][idx] @ q["w"] + q["b"], data["y"][idx]))(p)
            return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g), None

        return jax.lax.scan(body, params, jax.random.split(key, steps))[0]

    return train


TRAIN = _logreg_train()


def _accuracy(params, x, y):
    return float(jnp.mean(jnp.argmax(jnp.asarray(x) @ params["w"] + params["b"], -1) == jnp.asarray(y)))


def test_boom_merges_models_trained_on_bootstraps(digits):
    data = {"x": jnp.asarray(digits["x_train"][:600]), "y": jnp.asarray(digits["y_train"][:600])}
    init = {"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))}
    train = TRAIN
    key = jax.random.key(3)
    res = boom(init, train, data, key, num_models=3)
    n = data["x"].shape[0]
    for m, idx in enumerate(res.subsets):
        assert idx.shape == (n,) and len(np.unique(idx)) < n  # bootstrap: with replacement
        member = train(init, take_examples(data, idx), member_keys(key, m)[1])
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), res.members[m], member)
    slerped = multi_slerp(init, res.members)  # the default merge, around the common start
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.params, slerped)
    avg = boom(init, train, data, key, num_models=3, merge=weight_average).params
    jax.tree_util.tree_map(lambda a, *ms: np.testing.assert_allclose(a, np.mean(np.stack(ms), axis=0), rtol=1e-5,
                                                                     atol=1e-6), avg, *res.members)
    assert not np.allclose(avg["w"], res.params["w"])  # Multi-SLERP keeps the members' mean norm
    assert not np.array_equal(res.subsets[0], res.subsets[1])
    assert _accuracy(res.params, digits["x_test"], digits["y_test"]) > 0.8

    with pytest.raises(ValueError, match="got 1 sampling ratios for num_models=2"):
        boom(init, train, data, key, num_models=2, ratios=[0.5])


def test_sample_indices_bootstrap_and_subsample():
    key = jax.random.key(0)
    boot = sample_indices(key, 1000, 0.5)
    sub = sample_indices(key, 1000, 0.25, replace=False)
    assert boot.shape == (500,) and len(np.unique(boot)) < 500 and boot.min() >= 0 and boot.max() < 1000
    assert sub.shape == (250,) and len(np.unique(sub)) == 250
    with pytest.raises(ValueError, match=r"sampling ratio must be in \(0, 1\], got 1.5"):
        sample_indices(key, 10, 1.5, replace=False)


def _mirror(x):
    return np.asarray(x).reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)


def test_boom_update_keeps_structure_and_improves_on_new_data(digits):
    """Domain-incremental: the existing model saw 600 digits; the new data are 600 other digits
    mirrored left-right (a new domain, same classes)."""
    x, y = digits["x_train"], digits["y_train"]
    history = {"x": jnp.asarray(x[:600]), "y": jnp.asarray(y[:600])}
    new_data = {"x": jnp.asarray(_mirror(x[600:])), "y": jnp.asarray(y[600:])}
    train = TRAIN
    init = {"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))}
    existing = boom(init, train, history, jax.random.key(0), num_models=2).params
    xt, yt = digits["x_test"], digits["y_test"]
    res = boom_update(existing, train, new_data, history, jax.random.key(1), history_ratio=0.1)
    assert jax.tree_util.tree_structure(res.params) == jax.tree_util.tree_structure(existing)
    for a, b in zip(jax.tree_util.tree_leaves(res.params), jax.tree_util.tree_leaves(existing)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert res.subsets[0].shape == (600 + 60,)  # all new data + 10% of the history
    jax.tree_util.tree_map(lambda a, e, u: np.testing.assert_allclose(a, (e + u) / 2, rtol=1e-5, atol=1e-6),
                           res.params, existing, res.members[0])
    new_before, new_after = _accuracy(existing, _mirror(xt), yt), _accuracy(res.params, _mirror(xt), yt)
    old_before, old_after = _accuracy(existing, xt, yt), _accuracy(res.params, xt, yt)
    assert new_after > new_before + 0.15
    assert old_after > old_before - 0.05
