"""Averaging, greedy soup, task arithmetic, grid search, TIES (by hand and against a flattened reference), DARE."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.merging import (
    dare_drop,
    dare_merging,
    disjoint_mean,
    elect_sign,
    greedy_soup,
    grid_search,
    stack_trees,
    task_arithmetic,
    ties_merging,
    weight_average,
)

from .helpers import flat, jit_merge, random_tree


def test_weight_average_weighted_closed_form():
    p0 = {"w": np.zeros(3, np.float32)}
    fts = [{"w": np.array([1.0, 2.0, 3.0], np.float32)}, {"w": np.array([3.0, 0.0, -1.0], np.float32)}]
    np.testing.assert_allclose(weight_average(p0, fts)["w"], [2.0, 1.0, 1.0])
    np.testing.assert_allclose(weight_average(p0, fts, weights=[3.0, 1.0])["w"], [1.5, 1.5, 2.0])


def test_task_arithmetic_closed_form_scalar_and_per_task(models):
    p0, fts = models
    out = jit_merge(task_arithmetic, lam=0.4)(p0, fts)
    want = flat(p0) + 0.4 * sum(flat(f) - flat(p0) for f in fts)
    np.testing.assert_allclose(flat(out), want, rtol=1e-5, atol=1e-6)
    out = jit_merge(task_arithmetic, lam=[1.0, 0.0, -0.5])(p0, fts)
    want = flat(p0) + (flat(fts[0]) - flat(p0)) - 0.5 * (flat(fts[2]) - flat(p0))
    np.testing.assert_allclose(flat(out), want, rtol=1e-5, atol=1e-6)


def test_grid_search_picks_the_best_lambda(models):
    p0, fts = models
    target = task_arithmetic(p0, fts, lam=0.3)
    score = lambda params: -float(np.sum((flat(params) - flat(target)) ** 2))  # noqa: E731
    merge = jax.jit(task_arithmetic)  # lam traced: one compile for the whole grid
    res = grid_search(lambda lam: merge(p0, fts, lam), np.linspace(0, 1, 11)[1:], score)
    assert res.best_value == pytest.approx(0.3)
    assert len(res.scores) == 10
    np.testing.assert_allclose(flat(res.best_params), flat(target), rtol=1e-6)


def test_greedy_soup_by_hand():
    """Model soups Algorithm 1 on scalars, score -(theta - 0)^2. Individual scores order the
    ingredients -0.9, 1.0, -1.2, 3.0; {-0.9, 1.0} averages to 0.05 (kept, -0.0025 >= -0.81);
    adding -1.2 gives -0.367 and adding 3.0 gives 1.033: both rejected."""
    values = [1.0, -1.2, 3.0, -0.9]
    fts = [{"w": np.float32(v)} for v in values]
    calls = []

    def score(params):
        calls.append(float(params["w"]))
        return -float(params["w"]) ** 2

    res = greedy_soup({"w": np.float32(0.0)}, fts, score)
    assert res.ingredients == [3, 0]
    assert float(res.params["w"]) == pytest.approx(0.05, abs=1e-6)
    assert res.soup_score == pytest.approx(-0.0025, abs=1e-6)
    np.testing.assert_allclose(res.individual_scores, [-1.0, -1.44, -9.0, -0.81], rtol=1e-6)
    assert len(calls) == 2 * len(values) - 1
    assert res.soup_score >= max(res.individual_scores)  # never worse than the best single model


def test_greedy_soup_keeps_all_when_averaging_helps(models):
    p0, fts = models
    target = weight_average(p0, fts)  # the uniform soup is the optimum of this score
    res = greedy_soup(p0, fts, lambda params: -float(np.sum((flat(params) - flat(target)) ** 2)))
    assert sorted(res.ingredients) == list(range(len(fts)))
    np.testing.assert_allclose(flat(res.params), flat(target), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup(p0, [], lambda params: 0.0)


# ------------------------------------------------------------------------------------------ TIES


def test_ties_elect_and_disjoint_mean_by_hand():
    # 3 tasks, 5 entries (already trimmed).
    tau = np.array(
        [
            [1.0, -2.0, 0.0, 3.0, 1.0],
            [2.0, 1.0, 0.0, -1.0, -1.0],
            [-4.0, 0.5, 0.0, -1.0, 0.0],
        ],
        np.float32,
    )
    stacked = {"w": jnp.asarray(tau)}
    sign = elect_sign(stacked)
    # sums: -1, -0.5, 0, 1, 0 -> signs -1, -1, (majority), +1, (majority); majority of
    # sign(sums) = sign(-1 - 1 + 0 + 1 + 0) = -1.
    np.testing.assert_array_equal(sign["w"], [-1, -1, -1, 1, -1])
    merged = disjoint_mean(stacked, sign)
    # entry 0: only -4 agrees -> -4; entry 1: only -2 -> -2; entry 2: none -> 0;
    # entry 3: only 3 -> 3; entry 4: only -1 -> -1.
    np.testing.assert_allclose(merged["w"], [-4.0, -2.0, 0.0, 3.0, -1.0])
    stacked2 = {"w": jnp.asarray([[1.0, 2.0], [3.0, -1.0], [-1.0, -0.5]])}
    # sums 3, 0.5 -> +,+; means over agreeing: (1+3)/2, 2/1
    np.testing.assert_allclose(disjoint_mean(stacked2, elect_sign(stacked2))["w"], [2.0, 2.0])


def ties_reference(p0, fts, top_k, lam):
    """TIES on the flattened T x N matrix (FusionBench's layout) with the documented tie rule."""
    base = flat(p0)
    tv = np.stack([flat(f) - base for f in fts]).astype(np.float32)
    n_keep = int(tv.shape[1] * top_k)
    trimmed = np.zeros_like(tv)
    for t in range(tv.shape[0]):
        a = np.abs(tv[t])
        thr = np.partition(a, a.size - n_keep)[a.size - n_keep]
        trimmed[t] = np.where(a >= thr, tv[t], 0.0)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = trimmed * sign > 0
    merged = np.where(agree, trimmed, 0.0).sum(0) / np.maximum(agree.sum(0), 1)
    return base + lam * merged


@pytest.mark.parametrize("decimals", [None, 1])
def test_ties_matches_flattened_reference(decimals):
    rng = np.random.default_rng(5)
    p0 = random_tree(rng)
    fts = [jax.tree_util.tree_map(lambda a, d: a + d, p0, random_tree(rng, scale=0.1, decimals=decimals + 1 if decimals else None)) for _ in range(4)]
    merge = jax.jit(functools.partial(ties_merging, top_k=0.2, lam=0.7))
    np.testing.assert_allclose(flat(merge(p0, fts)), ties_reference(p0, fts, 0.2, 0.7), rtol=1e-5, atol=1e-6)


def test_ties_per_tensor_differs_and_trims_each_leaf():
    p0 = {"a": np.zeros(10, np.float32), "b": np.zeros(10, np.float32)}
    big = {"a": np.arange(1, 11, dtype=np.float32) * 100, "b": np.arange(1, 11, dtype=np.float32)}
    # single task: global top-20% (4 of 20) keeps a's four largest only; per-tensor keeps two
    # per leaf.
    glob = jax.jit(functools.partial(ties_merging, top_k=0.2, lam=1.0))(p0, [big])
    per = jax.jit(functools.partial(ties_merging, top_k=0.2, lam=1.0, per_tensor=True))(p0, [big])
    np.testing.assert_array_equal(np.nonzero(np.asarray(glob["a"]))[0], [6, 7, 8, 9])
    np.testing.assert_array_equal(np.nonzero(np.asarray(per["a"]))[0], [8, 9])
    assert not np.any(np.asarray(glob["b"]))
    np.testing.assert_array_equal(np.nonzero(np.asarray(per["b"]))[0], [8, 9])
    np.testing.assert_allclose(per["b"][8:], [9.0, 10.0])


# ------------------------------------------------------------------------------------------ DARE


def test_dare_drop_rescales_survivors_exactly():
    tau = {"w": jnp.ones((2, 2000), jnp.float32) * 2.0}
    out = np.asarray(dare_drop(jax.random.key(0), tau, p=0.75)["w"])
    assert set(np.unique(out)) <= {0.0, 8.0}
    assert abs((out != 0).mean() - 0.25) < 0.05
    assert not np.array_equal(out[0], out[1])  # tasks get independent masks


SMALL = {"a": (4, 8), "b": (8,)}


@pytest.fixture
def small_models(rng):
    p0 = random_tree(rng, SMALL)
    return p0, [jax.tree_util.tree_map(lambda a, d: a + d, p0, random_tree(rng, SMALL, 0.1)) for _ in range(3)]


def test_dare_expectation_matches_task_arithmetic(small_models):
    p0, fts = small_models
    merge = jax.jit(functools.partial(dare_merging, p=0.5, combine="ta", lam=0.3))
    keys = jax.random.split(jax.random.key(1, impl="rbg"), 1000)  # rbg: fast to compile on CPU
    outs = jax.vmap(lambda k: merge(p0, fts, key=k))(keys)
    mean = flat(jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), outs))
    ta = flat(task_arithmetic(p0, fts, lam=0.3))
    # std of the mean per entry: 0.3 * sqrt(sum_t tau_t^2 * p / (1 - p)) / sqrt(1000) ~ 0.003
    np.testing.assert_allclose(mean, ta, atol=0.015)
    single = flat(jax.tree_util.tree_map(lambda x: x[0], outs))
    assert np.abs(single - ta).max() > 0.05  # a single draw is not TA


def test_dare_ties_equals_ties_without_trim_on_dropped_vectors(small_models):
    p0, fts = small_models
    key = jax.random.key(2, impl="rbg")
    tau = stack_trees([jax.tree_util.tree_map(lambda f, p: f - p, f, p0) for f in fts])

    @jax.jit
    def run(p0, fts, tau, key):
        return dare_merging(p0, fts, key=key, p=0.3, combine="ties", lam=1.0), dare_drop(key, tau, 0.3)

    out, dropped = run(p0, fts, tau, key)
    d = np.stack([flat(jax.tree_util.tree_map(lambda x: x[t], dropped)) for t in range(3)])
    sign = np.sign(d.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = d * sign > 0
    want = flat(p0) + np.where(agree, d, 0).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(flat(out), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="combine"):
        dare_merging(p0, fts, key=key, combine="nope")


def test_dare_keep_is_a_counter_based_bernoulli_stream():
    """The DARE generator: keep rate 1 - p within 5 sigma over 2**21 draws, any chunk of a leaf
    drawn alone equals that slice of the whole draw, and tasks / leaves / neighbouring entries
    are uncorrelated (|corr| < 5 / sqrt(n))."""
    from mtl_jax.merging.ties import dare_keep, drop_threshold

    key, n, p = jax.random.key(3), 1 << 21, 0.9
    keep = np.asarray(dare_keep(key, 5, 2, jnp.arange(n, dtype=jnp.uint32), p))
    assert abs(keep.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / keep.size)
    chunk = np.asarray(dare_keep(key, 5, 2, jnp.arange(1000, 3000, dtype=jnp.uint32), p))
    np.testing.assert_array_equal(chunk, keep[:, 1000:3000])
    other_leaf = np.asarray(dare_keep(key, 6, 1, jnp.arange(n, dtype=jnp.uint32), p))[0]
    corr = lambda a, b: np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]
    for a, b in [(keep[0], keep[1]), (keep[0], other_leaf), (keep[0][:-1], keep[0][1:])]:
        assert abs(corr(a, b)) < 5 / np.sqrt(n)
    assert drop_threshold(0.5) == 2**31 and drop_threshold(0.0) == 0  # exactly p where p * 2**32 is an integer
