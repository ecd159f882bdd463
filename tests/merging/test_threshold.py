"""The global k-th largest |value| by bit-pattern bisection equals the flattened reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.merging import kth_largest_abs, stack_trees, topk_mask
from mtl_jax.merging.threshold import num_kept

from .helpers import flat, random_tree


def ref_kth_largest(vec, k):
    """Flattened reference: np.partition on the concatenated magnitudes (k-th largest, 1-indexed)."""
    a = np.abs(vec.astype(np.float32))
    if k <= 0:
        return np.inf
    k = min(k, a.size)
    return np.partition(a, a.size - k)[a.size - k]


@jax.jit
def _kth_batched(tree, k):  # k traced: one compile for every rank
    return kth_largest_abs(tree, k, batched=True)


@pytest.mark.parametrize("decimals", [None, 1])
def test_kth_largest_matches_flattened_reference(decimals):
    rng = np.random.default_rng(3)
    trees = [random_tree(rng, decimals=decimals) for _ in range(3)]
    stacked = stack_trees(trees)
    n = flat(trees[0]).size
    for k in [0, 1, 2, 7, n // 5, n // 2, n - 1, n, n + 10]:
        got = np.asarray(_kth_batched(stacked, k))
        want = [ref_kth_largest(flat(t), k) for t in trees]
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))


def test_kth_largest_unbatched_edge_cases():
    tree = {"a": np.array([0.0, -3.0, 2.0, 2.0]), "b": np.array([[-2.0, 1.0]])}
    assert float(kth_largest_abs(tree, 1)) == 3.0
    assert float(jax.jit(kth_largest_abs)(tree, 2)) == 2.0  # traced k, unbatched
    assert float(kth_largest_abs(tree, 2)) == 2.0  # three entries tie at |2|
    assert float(kth_largest_abs(tree, 4)) == 2.0
    assert float(kth_largest_abs(tree, 5)) == 1.0
    assert float(kth_largest_abs(tree, 6)) == 0.0
    assert float(kth_largest_abs(tree, 0)) == np.inf


def test_topk_mask_tie_rule_keeps_all_tied_entries():
    tree = {"a": np.array([0.0, -3.0, 2.0, 2.0]), "b": np.array([[-2.0, 1.0]])}
    mask = topk_mask(tree, 2 / 6)  # k = 2 -> threshold |2|, all three |2| entries kept
    np.testing.assert_array_equal(mask["a"], [False, True, True, True])
    np.testing.assert_array_equal(mask["b"], [[True, False]])


def test_topk_mask_equals_reference_global_and_per_tensor():
    rng = np.random.default_rng(4)
    trees = [random_tree(rng, decimals=1) for _ in range(2)]
    stacked = stack_trees(trees)
    frac = 0.2
    got = jax.jit(functools.partial(topk_mask, fraction=frac, batched=True))(stacked)
    for t, tree in enumerate(trees):
        vec = flat(tree)
        thr = ref_kth_largest(vec, num_kept(vec.size, frac))
        want = np.abs(vec.astype(np.float32)) >= thr
        np.testing.assert_array_equal(flat(jax.tree_util.tree_map(lambda m: m[t], got)).astype(bool), want)
        assert want.sum() >= int(vec.size * frac)
    per = jax.jit(functools.partial(topk_mask, fraction=frac, batched=True, per_tensor=True))(stacked)
    for leaf_mask, leaf in zip(jax.tree_util.tree_leaves(per), jax.tree_util.tree_leaves(stacked)):
        for t in range(2):
            v = np.asarray(leaf[t]).reshape(-1)
            thr = ref_kth_largest(v, int(v.size * frac))
            np.testing.assert_array_equal(np.asarray(leaf_mask[t]).reshape(-1), np.abs(v) >= thr)


def test_threshold_on_bf16_and_negative_zero():
    x = jnp.asarray(np.array([-0.0, 0.5, -1.25, 3.0], np.float32), jnp.bfloat16)
    assert float(kth_largest_abs({"x": x}, 2)) == 1.25
    assert float(kth_largest_abs({"x": x}, 4)) == 0.0
