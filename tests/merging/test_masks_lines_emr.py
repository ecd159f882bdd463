"""TALL masks, bit packing, Consensus merging, LiNeS and EMR against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.merging import (
    consensus_mask,
    consensus_merging,
    emr_merging,
    emr_retrieve,
    lines_alpha,
    lines_edit,
    lines_merging,
    lines_scale,
    lines_schedule,
    pack_bits,
    retrieve,
    select_tall_lambdas,
    stack_trees,
    tall_mask_compress,
    tall_masks,
    task_slice,
    ties_merge_vector,
    unpack_bits,
)

from .helpers import flat, jit_merge

# ------------------------------------------------------------------------------------ TALL masks


def test_tall_mask_rule_is_strict_by_hand():
    tau = jnp.asarray([[1.0, 0.2, -1.0, 0.0], [1.0, -0.2, 1.0, 0.5]])
    # tau_MTL = [2, 0, 0, 0.5]; |tau_MTL - tau_t|: t0 = [1, 0.2, 1, 0.5], t1 = [1, 0.2, 1, 0]
    masks = tall_masks({"w": tau}, lam=1.0)["w"]
    # t0: 1>1 F, .2>.2 F, 1>1 F, 0>.5 F;  t1: 1>1 F, .2>.2 F, 1>1 F, .5>0 T
    np.testing.assert_array_equal(masks, [[False, False, False, False], [False, False, False, True]])
    masks = tall_masks({"w": tau}, lam=[0.5, 2.0])["w"]
    # t0 (lam .5): 1>.5 T, .2>.1 T, 1>.5 T, 0>.25 F;  t1 (lam 2): 1>2 F, .2>.4 F, 1>2 F, .5>0 T
    np.testing.assert_array_equal(masks, [[True, True, True, False], [False, False, False, True]])
    given = {"w": jnp.asarray([1.0, 0.0, 0.0, 0.0])}
    masks = tall_masks({"w": tau}, merged_tau=given, lam=1.0)["w"]
    # |given - tau_t|: t0 = [0, .2, 1, 0], t1 = [0, .2, 1, .5]
    np.testing.assert_array_equal(masks, [[True, False, False, False], [True, False, False, False]])


def test_pack_bits_matches_numpy_and_roundtrips():
    rng = np.random.default_rng(6)
    m = rng.random((3, 5, 7)) > 0.5
    packed = pack_bits(jnp.asarray(m), batch_dims=1)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5)  # ceil(35 / 8)
    for t in range(3):
        np.testing.assert_array_equal(packed[t], np.packbits(m[t].reshape(-1)))
    np.testing.assert_array_equal(unpack_bits(packed, (5, 7)), m)
    np.testing.assert_array_equal(unpack_bits(pack_bits(jnp.asarray(m[0])), (5, 7)), m[0])


def test_tall_compress_and_retrieve(models):
    p0, fts = models
    comp = jit_merge(tall_mask_compress, lam=0.4)(p0, fts)
    rebuild = jax.jit(retrieve)
    tau = np.stack([flat(f) - flat(p0) for f in fts])
    mtl = tau.sum(0)
    np.testing.assert_allclose(flat(comp.merged_tau), mtl, rtol=1e-5, atol=1e-6)
    for t in range(3):
        mask = np.abs(tau[t]) > 0.4 * np.abs(mtl - tau[t])
        rebuilt = rebuild(p0, comp.merged_tau, task_slice(comp.packed_masks, t))
        np.testing.assert_allclose(flat(rebuilt), flat(p0) + mask * mtl, rtol=1e-5, atol=1e-6)
        assert 0 < mask.mean() < 1


def test_select_tall_lambdas_picks_each_tasks_best_reconstruction(models):
    """Scored by closeness to the task's own fine-tuned model (a stand-in for validation accuracy),
    each task gets the grid lambda whose reconstruction theta_0 + m_t * tau_MTL is closest, computed here by hand."""
    p0, fts = models
    tau = np.stack([flat(f) - flat(p0) for f in fts])
    mtl = tau.sum(0)
    grid = (0.1, 0.4, 1.0, 3.0)
    want_scores = np.array([[-np.linalg.norm(flat(p0) + (np.abs(tau[t]) > lam * np.abs(mtl - tau[t])) * mtl - flat(fts[t]))
                             for t in range(3)] for lam in grid])
    score = lambda trees: [-np.linalg.norm(flat(m) - flat(f)) for m, f in zip(trees, fts)]  # noqa: E731
    best, scores = select_tall_lambdas(p0, fts, score, grid)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4)
    assert best == [grid[i] for i in np.argmax(want_scores, axis=0)]
    with pytest.raises(ValueError, match=r"one score per task \(3\)"):
        select_tall_lambdas(p0, fts, lambda trees: [0.0, 1.0], grid)


def test_consensus_mask_counts_by_hand():
    masks = {"w": jnp.asarray([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], bool)}
    np.testing.assert_array_equal(consensus_mask(masks, k=2)["w"], [True, False, False, False])
    np.testing.assert_array_equal(consensus_mask(masks, k=1)["w"], [True, True, True, False])
    np.testing.assert_array_equal(consensus_mask(masks, k=3)["w"], [True, False, False, False])


@pytest.mark.parametrize("base", ["ta", "ties"])
def test_consensus_merging_reference(models, base):
    p0, fts = models
    tau = np.stack([flat(f) - flat(p0) for f in fts])
    if base == "ta":
        mtl = tau.sum(0)
    else:
        stacked = stack_trees([jax.tree_util.tree_map(lambda f, p: f - p, f, p0) for f in fts])
        mtl = flat(jit_merge(ties_merge_vector, top_k=0.2)(stacked))
    masks = np.abs(tau) > 0.4 * np.abs(mtl[None] - tau)
    cons = masks.sum(0) >= 2
    out = jit_merge(consensus_merging, k=2, tall_lambda=0.4, lam=0.5, base=base)(p0, fts)
    np.testing.assert_allclose(flat(out), flat(p0) + 0.5 * cons * mtl, rtol=1e-5, atol=1e-6)
    assert 0 < cons.mean() < 1


# ------------------------------------------------------------------------------------------ LiNeS


def test_lines_schedule_values():
    np.testing.assert_allclose(lines_schedule(5, 0.2, 0.8), [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(lines_schedule(3, 0.5, 0.5), [0.5, 0.75, 1.0])
    np.testing.assert_allclose(lines_schedule(1, 0.3, 0.7), [0.3])


def test_lines_scale_per_block_and_unindexed_leaves():
    ones = lambda: np.ones(2, np.float32)  # noqa: E731
    tau = {"embed": ones(), "block_0": {"k": ones()}, "block_1": {"k": ones()}, "block_2": {"k": ones()}, "head": ones()}
    out = lines_scale(tau, alpha=0.1, beta=0.6)
    np.testing.assert_allclose(out["block_0"]["k"], 0.1)
    np.testing.assert_allclose(out["block_1"]["k"], 0.4)
    np.testing.assert_allclose(out["block_2"]["k"], 0.7)
    np.testing.assert_allclose(out["embed"], 0.1)
    np.testing.assert_allclose(out["head"], 0.1)
    out = lines_scale(tau, alpha=0.1, beta=0.6, num_blocks=5)  # explicit L: block 2 of 5
    np.testing.assert_allclose(out["block_2"]["k"], 0.1 + 0.6 * 2 / 4)
    with pytest.raises(ValueError, match="block_2/k"):
        lines_scale(tau, 0.1, 0.6, num_blocks=2)
    # no leaf with a block index (an MLP's dense_{i}): an error, not a uniform alpha rescaling
    mlp = {"dense_0": {"kernel": ones()}, "dense_1": {"kernel": ones()}}
    with pytest.raises(ValueError, match=r"no block index in any leaf path \(e.g. \['dense_0/kernel', "
                                         r"'dense_1/kernel'\]\) with default_layer_index"):
        lines_scale(mlp, 0.1, 0.6)
    dense_index = lambda path: int(path[len("dense_")]) if path.startswith("dense_") else None  # noqa: E731
    np.testing.assert_allclose(lines_scale(mlp, 0.1, 0.6, layer_index_fn=dense_index)["dense_1"]["kernel"], 0.7)


def test_lines_edit_single_task(models):
    p0, fts = models
    out = jit_merge(lines_edit, lam=0.25)(p0, fts[0])
    tau = jax.tree_util.tree_map(lambda f, p: f - p, fts[0], p0)
    # blocks 0..2 -> 0.25, 0.625, 1.0; embed/heads -> 0.25
    for name, s in [("block_0", 0.25), ("block_1", 0.625), ("block_2", 1.0)]:
        np.testing.assert_allclose(
            out["shared"][name]["Dense_0"]["kernel"], p0["shared"][name]["Dense_0"]["kernel"] + s * tau["shared"][name]["Dense_0"]["kernel"], rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(out["heads"]["cls"]["kernel"], p0["heads"]["cls"]["kernel"] + 0.25 * tau["heads"]["cls"]["kernel"], rtol=1e-5, atol=1e-6)


def test_lines_merging_alpha_rule(models):
    p0, fts = models
    stacked = stack_trees([jax.tree_util.tree_map(lambda f, p: f - p, f, p0) for f in fts])
    summed = jax.tree_util.tree_map(lambda x: x.sum(0), stacked)
    np.testing.assert_allclose(jax.jit(lines_alpha)(stacked, summed), 1.0 / 3, rtol=1e-6)  # TA: alpha = 1/T
    ties = jit_merge(ties_merge_vector, top_k=0.2)(stacked)
    tau = np.stack([flat(f) - flat(p0) for f in fts])
    want = np.abs(tau.sum(0)).sum() / np.abs(flat(ties)).sum() / 3
    np.testing.assert_allclose(jax.jit(lines_alpha)(stacked, ties), want, rtol=1e-5)
    out = jit_merge(lines_merging, beta=0.6, base="ta")(p0, fts)
    k = "kernel"
    np.testing.assert_allclose(
        out["shared"]["block_1"]["Dense_0"][k],
        p0["shared"]["block_1"]["Dense_0"][k] + (1 / 3 + 0.3) * summed["shared"]["block_1"]["Dense_0"][k],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(out["heads"]["cls"][k], p0["heads"]["cls"][k] + summed["heads"]["cls"][k] / 3, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------- EMR


def test_emr_by_hand():
    p0 = {"w": np.zeros(4, np.float32)}
    fts = [{"w": np.array([1.0, -2.0, 3.0, 0.0], np.float32)}, {"w": np.array([2.0, 1.0, -1.0, 1.0], np.float32)}]
    emr = emr_merging(p0, fts)
    # sum = [3, -1, 2, 1] -> sigma = [+, -, +, +]; tau_uni = sigma * max agreeing |tau| = [2, -2, 3, 1]
    np.testing.assert_allclose(emr.tau_uni["w"], [2.0, -2.0, 3.0, 1.0])
    # M_0 = [1, 1, 1, 0]; M_1 = [1, 0, 0, 1]
    # s_0 = (1+2+3+0) / (2+2+3) = 6/7; s_1 = (2+1+1+1) / (2+1) = 5/3
    np.testing.assert_allclose(emr.rescalers, [6 / 7, 5 / 3], rtol=1e-6)
    np.testing.assert_allclose(emr_retrieve(p0, emr, 0)["w"], 6 / 7 * np.array([2.0, -2.0, 3.0, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(emr_retrieve(p0, emr, 1)["w"], 5 / 3 * np.array([2.0, 0.0, 0.0, 1.0]), rtol=1e-6)


def test_emr_rescalers_sum_over_whole_model(models):
    p0, fts = models
    emr = jax.jit(emr_merging)(p0, fts)
    tau = np.stack([flat(f) - flat(p0) for f in fts])
    sigma = np.sign(tau.sum(0))
    masks = tau * sigma > 0
    uni = sigma * np.where(masks, np.abs(tau), 0).max(0)
    np.testing.assert_allclose(flat(emr.tau_uni), uni, rtol=1e-5, atol=1e-7)
    want = np.abs(tau).sum(1) / np.abs(masks * uni).sum(1)
    np.testing.assert_allclose(emr.rescalers, want, rtol=1e-5)
    np.testing.assert_allclose(flat(jax.jit(emr_retrieve)(p0, emr, 2)), flat(p0) + want[2] * masks[2] * uni, rtol=1e-5, atol=1e-6)
