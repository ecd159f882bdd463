"""The layer-wise Gramian's fast paths (train/gradients/layerwise.py): both contraction routes, the bias
folded into the input Gram, the row-major cotangents, ``J^T w`` from the rows, and the compiled
program's copies of the per-task cotangents."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.train.gradients import layerwise as L


def _rows(x, d):
    """Explicit per-task rows [K, i * o + o] (kernel then bias) of X [R, i], D [K, R, o]."""
    kernel = np.einsum("ri,kro->kio", x, d).reshape(d.shape[0], -1)
    return np.concatenate([kernel, d.sum(axis=1)], axis=1)


@pytest.mark.parametrize("route", L.CONTRACTIONS)
@pytest.mark.parametrize("kernel,bias", [(True, False), (True, True), (False, True)])
def test_both_routes_give_the_gramian_of_the_explicit_rows(route, kernel, bias):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 6)), rng.normal(size=(7, 6))
    d, e = rng.normal(size=(4, 9, 5)), rng.normal(size=(3, 7, 5))
    cols = slice(0 if kernel else 6 * 5, None if bias else 6 * 5)
    g, h = _rows(x, d)[:, cols], _rows(y, e)[:, cols]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    by_row = lambda a: jnp.moveaxis(f32(a), 0, 1)
    got = L.rows_gramian(f32(x), by_row(d), route=route, kernel=kernel, bias=bias)
    np.testing.assert_allclose(got, g @ g.T, rtol=1e-4, atol=1e-4)
    cross = L.rows_gramian(f32(x), by_row(d), f32(y), by_row(e), route=route, kernel=kernel, bias=bias)
    np.testing.assert_allclose(cross, g @ h.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(L.dense_gramian(f32(x), f32(d), route=route, kernel=kernel, bias=bias), g @ g.T,
                               rtol=1e-4, atol=1e-4)


def test_the_flop_rule_picks_the_input_gram_for_wide_layers_and_the_rows_for_narrow_ones():
    # the benchmark's layers: 256 rows, 785 / 513 inputs (bias column), 512 outputs, K = 10 or 40
    for k in (10, 40):
        assert L.choose_contraction(256, 256, 785, k, k, 512) == L.INPUT_GRAM
    flops = L.contraction_flops(4096, 4096, 9, 3, 3, 16)  # many rows, a narrow layer
    assert flops[L.EXPLICIT_ROWS] < flops[L.INPUT_GRAM]
    assert L.choose_contraction(4096, 4096, 9, 3, 3, 16) == L.EXPLICIT_ROWS
    with pytest.raises(ValueError, match="unknown contraction route 'gram'"):
        L.rows_gramian(jnp.ones((2, 3)), jnp.ones((2, 1, 4)), route="gram")


def test_weighted_rows_is_the_weighted_sum_over_tasks():
    rng = np.random.default_rng(1)
    d, w = rng.normal(size=(6, 4, 5)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    np.testing.assert_allclose(L.weighted_rows(jnp.asarray(d), jnp.asarray(w)), np.einsum("rko,k->ro", d, w),
                               rtol=1e-5, atol=1e-5)


class NormedMLP(nn.Module):
    """Two Dense layers (covered) around a LayerNorm (uncovered: explicit rows)."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(jnp.tanh(nn.Dense(6)(x)))
        return nn.Dense(4)(h)


def _problem(num_tasks=3):
    model = NormedMLP()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    targets = jnp.asarray(rng.normal(size=(num_tasks, 5, 4)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    forward = lambda p: jnp.mean((model.apply({"params": p}, x)[None] - targets) ** 2, axis=(1, 2))
    return params, forward


def test_combine_rows_reads_every_leaf_from_the_rows():
    """``J^T w`` from the rows (Dense kernels and biases from the cotangents, the LayerNorm from its
    explicit rows) equals the VJP with ``w``, whatever tree is passed for the structure."""
    params, forward = _problem()
    w = jnp.asarray([0.5, -1.0, 2.0])

    def combined(p):
        _, _, rows_fn = L.vjp_and_layerwise_gramian(forward, p)
        rows = rows_fn(jnp.eye(3))
        assert len(rows.dense) == 2 and len(rows.rest) == 2  # LayerNorm scale and bias
        return L.combine_rows(rows, w, jax.tree.map(jnp.zeros_like, p))

    want = jax.vjp(forward, params)[1](w)[0]
    got = jax.jit(combined)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 2])
def test_row_major_cotangents_give_the_materialised_gramian(chunk):
    params, forward = _problem(4)

    def layerwise(p):
        _, _, rows_fn = L.vjp_and_layerwise_gramian(forward, p)
        rows = rows_fn(jnp.eye(4), chunk)
        assert all(d.shape[1] == 4 for _, d, _, _ in rows.dense)  # [R, K, o]
        return L.layerwise_gramian(rows)

    jac = jax.vmap(jax.vjp(forward, params)[1])(jnp.eye(4))[0]
    flat = jnp.concatenate([j.reshape(4, -1) for j in jax.tree.leaves(jac)], axis=1)
    np.testing.assert_allclose(jax.jit(layerwise)(params), flat @ flat.T, rtol=1e-4, atol=1e-6)


def test_the_compiled_gramian_and_combination_hold_no_transposed_products():
    """A 2-layer MLP, K tasks, both layers on the input-Gram route: the compiled Gramian + ``J^T w``
    writes no transposed ``(X X^T) D`` product ([K * o, R] or [K, R * o]) and at most 5 copies of the
    [K, R, o] cotangents (the GEMM to the layer below, and the row-major layout; XLA:CPU may write
    that once per consumer shape); the einsum route wrote 7 plus two transposed products."""
    num, rows, width = 3, 128, 256
    x = jnp.asarray(np.random.default_rng(3).normal(size=(rows, 300)), jnp.float32)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(width)(jax.nn.relu(nn.Dense(width)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), x)["params"]
    heads = jnp.asarray(np.random.default_rng(4).normal(size=(num, width)), jnp.float32)
    forward = lambda p: jnp.ones((rows,)) @ jnp.tanh(model.apply({"params": p}, x)) @ heads.T / rows
    assert L.choose_contraction(rows, rows, 301, num, num, width) == L.INPUT_GRAM

    def step(p):
        _, vjp_fn, rows_fn = L.vjp_and_layerwise_gramian(forward, p)
        rows = rows_fn(jnp.eye(num))
        g = L.layerwise_gramian(rows)
        w = jax.nn.softmax(-jnp.diagonal(g))
        return g, L.combine_rows(rows, w, vjp_fn(w)[0])

    hlo = jax.jit(step).lower(params).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    copies = []
    for line in entry.splitlines():
        head = line.split("=", 1)
        if len(head) < 2 or any(op in line for op in (" parameter(", " bitcast(", " dot(", "kind=kCustom")):
            continue
        shape = head[1].strip().split("{")[0].split(" ")[0]
        if shape.startswith("f32[") and "," in shape:
            if int(np.prod([int(v) for v in shape[4:-1].split(",")])) == num * rows * width:
                copies.append(shape)
    assert len(copies) <= 5, copies
    assert f"f32[{num * width},{rows}]" not in entry and f"f32[{num},{rows * width}]" not in entry
