"""TSV-M, Iso-C/Iso-CTS, Fisher, RegMean, SLERP and Model Stock against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.merging import (
    fisher_merging,
    iso_c_matrix,
    iso_c_merging,
    iso_cts_merging,
    iso_cts_factors,
    iso_cts_matrix,
    model_stock,
    regmean_merging,
    multi_slerp,
    slerp,
    tsv_factors,
    tsv_matrix,
    tsv_merging,
)
from mtl_jax.merging.svd_merging import iso_cts_sizes

from .helpers import jit_merge

# ------------------------------------------------------------------------------------------- SVD


@pytest.fixture
def stack():
    return jnp.asarray(np.random.default_rng(7).normal(size=(3, 12, 9)), jnp.float32)


def test_tsv_combined_u_and_v_are_orthonormal(stack):
    u, s, v = jax.jit(tsv_factors)(stack)
    k = 9 // 3
    assert u.shape == (12, 3 * k) and v.shape == (3 * k, 9) and s.shape == (3 * k,)
    np.testing.assert_allclose(u.T @ u, np.eye(3 * k), atol=1e-5)
    np.testing.assert_allclose(v @ v.T, np.eye(3 * k), atol=1e-5)
    # S holds each task's top-k singular values, in task order
    for t in range(3):
        np.testing.assert_allclose(s[t * k : (t + 1) * k], np.linalg.svd(np.asarray(stack[t]), compute_uv=False)[:k], rtol=1e-5)
    np.testing.assert_allclose(jax.jit(tsv_matrix)(stack), (u * s) @ v, atol=1e-5)


def test_tsv_single_task_is_lossless(stack):
    np.testing.assert_allclose(jax.jit(tsv_matrix)(stack[:1]), stack[0], atol=1e-5)


def test_tsv_merging_matrix_and_vector_leaves():
    rng = np.random.default_rng(8)
    p0 = {"w": np.zeros((8, 6), np.float32), "b": np.zeros(6, np.float32)}
    fts = [{"w": rng.normal(size=(8, 6)).astype(np.float32), "b": rng.normal(size=6).astype(np.float32)} for _ in range(2)]
    out = jit_merge(tsv_merging, alpha=0.5)(p0, fts)
    np.testing.assert_allclose(out["b"], 0.5 * (fts[0]["b"] + fts[1]["b"]) / 2, rtol=1e-5)
    np.testing.assert_allclose(out["w"], 0.5 * tsv_matrix(jnp.stack([fts[0]["w"], fts[1]["w"]])), atol=1e-5)
    ex = jit_merge(tsv_merging, alpha=1.0, exclude="w")(p0, fts)  # excluded matrix -> averaged
    np.testing.assert_allclose(ex["w"], (fts[0]["w"] + fts[1]["w"]) / 2, rtol=1e-5)


def test_svd_merges_call_only_unbatched_lapack_svds():
    """Batched CPU SVDs fan out into the intra-op pool they run on; two at once hung the 8-task ViT
    TSV-M merge on a 2-core machine, so every SVD of a merge must be 2-D."""
    rng = np.random.default_rng(9)
    p0 = {f"w{i}": np.zeros((8, 6), np.float32) for i in range(4)}
    fts = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()} for _ in range(3)]
    for merge in (tsv_merging, iso_c_merging, iso_cts_merging):
        hlo = jax.jit(merge).lower(p0, fts).as_text()
        calls = [line for line in hlo.splitlines() if "custom_call @lapack_sgesdd" in line]
        assert calls, merge.__name__
        assert all('num_batch_dims = "0"' in line for line in calls), merge.__name__


def test_iso_c_flat_spectrum(stack):
    m = jax.jit(iso_c_matrix)(stack)
    s = np.linalg.svd(np.asarray(m), compute_uv=False)
    s_sum = np.linalg.svd(np.asarray(stack.sum(0)), compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, s_sum.mean()), rtol=1e-4)
    # same singular subspaces as the task-arithmetic sum: m = mean(s) * U V^T
    u, _, vt = np.linalg.svd(np.asarray(stack.sum(0)), full_matrices=False)
    np.testing.assert_allclose(m, s_sum.mean() * u @ vt, atol=1e-4)


def test_iso_c_merging_averages_vectors_and_scales():
    rng = np.random.default_rng(9)
    p0 = {"w": np.ones((5, 4), np.float32), "b": np.ones(4, np.float32)}
    fts = [{"w": 1 + rng.normal(size=(5, 4)).astype(np.float32), "b": 1 + rng.normal(size=4).astype(np.float32)} for _ in range(3)]
    out = jit_merge(iso_c_merging, alpha=1.3)(p0, fts)
    tau_w = jnp.stack([f["w"] - 1 for f in fts])
    np.testing.assert_allclose(out["w"], 1 + 1.3 * iso_c_matrix(tau_w), atol=1e-5)
    np.testing.assert_allclose(out["b"], 1 + 1.3 * np.mean([f["b"] - 1 for f in fts], axis=0), atol=1e-5)


def test_iso_cts_sizes():
    assert iso_cts_sizes(9, 3, 0.8) == (9 - 3, 1)  # int(7.2)=7, round(2/3)=1 -> 3 task dims
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)  # 614 -> round(154/8)=19 -> 152
    assert iso_cts_sizes(4, 8, 0.8) == (4, 0)


def test_iso_cts_orthonormal_factors_flat_spectrum(stack):
    u, sigma, v = jax.jit(iso_cts_factors)(stack)
    assert u.shape == (12, 9) and v.shape == (9, 9)
    np.testing.assert_allclose(u.T @ u, np.eye(9), atol=1e-5)
    np.testing.assert_allclose(v @ v.T, np.eye(9), atol=1e-5)
    m = jax.jit(iso_cts_matrix)(stack)
    s = np.linalg.svd(np.asarray(m), compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, float(sigma)), rtol=1e-4)
    # mean of [top-1 singular value of each task's residual, top-6 of the sum]
    k_c, k_t = iso_cts_sizes(9, 3, 0.8)
    uu, ss, _ = np.linalg.svd(np.asarray(stack.sum(0)), full_matrices=False)
    uc = uu[:, :k_c]
    res = [np.asarray(stack[t]) - uc @ uc.T @ np.asarray(stack[t]) for t in range(3)]
    ts = [np.linalg.svd(r, compute_uv=False)[:k_t] for r in res]
    np.testing.assert_allclose(float(sigma), np.mean(np.concatenate(ts + [ss[:k_c]])), rtol=1e-5)


def test_iso_cts_with_full_common_space_is_iso_c(stack):
    np.testing.assert_allclose(
        jax.jit(lambda x: iso_cts_matrix(x, common_fraction=1.0))(stack), jax.jit(iso_c_matrix)(stack), atol=1e-4
    )


# ----------------------------------------------------------------------------- Fisher / RegMean


def test_fisher_merging_closed_form_and_floor():
    p0 = {"w": np.zeros(3, np.float32)}
    fts = [{"w": np.array([1.0, 1.0, 4.0], np.float32)}, {"w": np.array([3.0, -1.0, 0.0], np.float32)}]
    fishers = [{"w": np.array([1.0, 0.0, 0.0], np.float32)}, {"w": np.array([3.0, 2.0, 0.0], np.float32)}]
    out = fisher_merging(p0, fts, fishers)
    # entry 0: (1*1 + 3*3) / 4 = 2.5; entry 1: (1e-6*1 + 2*(-1)) / (2 + 1e-6) ~ -1;
    # entry 2: both floored to 1e-6 -> plain average 2.
    np.testing.assert_allclose(out["w"], [2.5, (1e-6 - 2.0) / (2.0 + 1e-6), 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"fishers\[1\]"):
        fisher_merging(p0, fts, [fishers[0], {"w": np.zeros(4, np.float32)}])


def test_regmean_solves_least_squares_and_averages_the_rest():
    rng = np.random.default_rng(10)
    xs = [rng.normal(size=(20, 5)) for _ in range(3)]
    ws = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3)]
    p0 = {"dense": {"kernel": np.zeros((5, 4), np.float32), "bias": np.zeros(4, np.float32)}}
    fts = [{"dense": {"kernel": w, "bias": np.full(4, float(i), np.float32)}} for i, w in enumerate(ws)]
    grams = [{"dense/kernel": (x.T @ x).astype(np.float32)} for x in xs]
    out = regmean_merging(p0, fts, grams, alpha=1.0)
    # alpha = 1: W* = argmin sum_t ||X_t W - X_t W_t||^2
    want = np.linalg.lstsq(np.concatenate(xs), np.concatenate([x @ w for x, w in zip(xs, ws)]), rcond=None)[0]
    np.testing.assert_allclose(out["dense"]["kernel"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["dense"]["bias"], np.full(4, 1.0))
    # alpha = 0.95: off-diagonal Gram entries scaled by alpha
    out = regmean_merging(p0, fts, grams, alpha=0.95)
    gs = [g["dense/kernel"] * 0.95 + np.diag(np.diag(g["dense/kernel"])) * 0.05 for g in grams]
    want = np.linalg.solve(sum(gs), sum(g @ w for g, w in zip(gs, ws)))
    np.testing.assert_allclose(out["dense"]["kernel"], want, rtol=1e-4, atol=1e-4)
    bad = [{"dense/kernel": np.eye(4, dtype=np.float32)}] * 3
    with pytest.raises(ValueError, match=r"dense/kernel.*\(5, 4\).*\(4, 4\)"):
        regmean_merging(p0, fts, bad)


# ----------------------------------------------------------------------------- SLERP / Model Stock


def test_slerp_on_orthogonal_vectors_and_lerp_fallback():
    p0 = {"w": np.zeros(2, np.float32)}
    a, b = {"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 2.0], np.float32)}
    out = slerp(p0, [a, b], t=1 / 3)
    # theta = pi/2: s0 = sin(pi/3) / 1, s1 = sin(pi/6) / 1
    np.testing.assert_allclose(out["w"], [np.sin(np.pi / 3), 2 * np.sin(np.pi / 6)], rtol=1e-6)
    c = {"w": np.array([2.0, 1e-4], np.float32)}  # nearly colinear with a -> linear interpolation
    np.testing.assert_allclose(slerp(p0, [a, c], t=0.25)["w"], [0.75 + 0.5, 0.25e-4], rtol=1e-5)
    np.testing.assert_allclose(slerp(p0, [a, b], t=0.0)["w"], a["w"], atol=1e-7)
    with pytest.raises(ValueError, match="exactly 2"):
        slerp(p0, [a, b, c])


def multislerp_reference(tensors, weights, base, eps=1e-8):
    """MergeKit's ``multislerp`` (barycentric interpolation on the hypersphere) transcribed in numpy."""
    x = np.stack(tensors).astype(np.float64) - base
    flat, w = x.reshape(len(tensors), -1), np.asarray(weights, np.float64) / np.sum(weights)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / (norms + eps)
    mean = (unit * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangent = ((unit - (unit @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    out = (mean * np.cos(tn) + tangent * np.sin(tn) / tn) * (norms[:, 0] * w).sum()
    return out.reshape(x.shape[1:]) + base


def test_multi_slerp_matches_the_reference_and_closed_forms():
    rng = np.random.default_rng(3)
    p0 = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    fts = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), p0) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    out = jax.jit(lambda p, f: multi_slerp(p, f, weights))(p0, fts)
    for k in p0:
        np.testing.assert_allclose(out[k], multislerp_reference([f[k] for f in fts], weights, p0[k]), rtol=1e-5,
                                   atol=1e-6)
    # two orthogonal unit task vectors, equal weights: the geodesic midpoint (u1 + u2) / sqrt(2), = SLERP at t = 1/2
    zero = {"w": np.zeros(2, np.float32)}
    u1, u2 = {"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 1.0], np.float32)}
    np.testing.assert_allclose(multi_slerp(zero, [u1, u2])["w"], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(multi_slerp(zero, [u1, u2])["w"], slerp(zero, [u1, u2], t=0.5)["w"], rtol=1e-6)
    # identical task vectors: that model; one model: itself; cancelling antipodal pair: the linear average
    np.testing.assert_allclose(multi_slerp(p0, [fts[0]] * 3)["a"], fts[0]["a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(multi_slerp(p0, fts[:1])["b"], fts[0]["b"])
    minus = {"w": -u1["w"]}
    np.testing.assert_allclose(multi_slerp(zero, [u1, minus])["w"], [0.0, 0.0], atol=1e-7)


def test_model_stock_two_models_by_hand():
    p0 = {"w": np.ones(2, np.float32)}
    ang = np.pi / 3  # cos = 1/2 -> t = 2 * 0.5 / (1 + 0.5) = 2/3
    fts = [{"w": 1 + np.array([1.0, 0.0], np.float32)}, {"w": 1 + 3 * np.array([np.cos(ang), np.sin(ang)], np.float32)}]
    out = jax.jit(model_stock)(p0, fts)
    avg = (fts[0]["w"] + fts[1]["w"]) / 2
    np.testing.assert_allclose(out["w"], 2 / 3 * avg + 1 / 3 * p0["w"], rtol=1e-5)


def test_model_stock_three_models_mean_angle():
    p0 = {"w": np.zeros(3, np.float32)}
    fts = [{"w": np.eye(3, dtype=np.float32)[i]} for i in range(3)]  # pairwise 90 degrees -> t = 0
    np.testing.assert_allclose(jax.jit(model_stock)(p0, fts)["w"], 0.0, atol=1e-6)
    d = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], np.float32)  # angles 45, 90, 45 -> mean 60
    out = jax.jit(model_stock)({"w": np.zeros(2, np.float32)}, [{"w": x} for x in d])
    t = 3 * 0.5 / (1 + 2 * 0.5)
    np.testing.assert_allclose(out["w"], t * d.mean(0), rtol=1e-5)
