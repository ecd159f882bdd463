"""The layer-wise Gramian (train/gradients/layerwise.py) against ``J J^T`` of the materialised shared Jacobian,
on models where Dense layers cover all, part or none of the shared parameters, and in the step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from mtl_jax import tasks as T
from mtl_jax.models import build_model
from mtl_jax.train.gradients import layerwise as L
from mtl_jax.train.forward import make_forward
from mtl_jax.train.gradients.combine import task_gradients
from mtl_jax.train.gradients.layerwise import gramian
from mtl_jax.train.gradients.options import gradient_options

from test_step_feeds import (assert_mode_steps_like_materialize, batch_of, exp_config_jacobian, init_params,
                             losses_fn, plain_experiment, recording, shared_jacobian)


@pytest.mark.parametrize("rows,in_dim,out_dim,num", [(6, 40, 30, 3), (64, 4, 5, 4)])
def test_dense_gramian_equals_the_gramian_of_explicit_rows_by_either_route(rows, in_dim, out_dim, num):
    """``<X^T D_k, Y^T E_l>``: the first shape goes through ``X Y^T`` (few rows, wide layer), the
    second through the explicit rows; both, and the cross version, equal the direct products."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(rows, in_dim)), rng.normal(size=(rows + 2, in_dim))
    d, e = rng.normal(size=(num, rows, out_dim)), rng.normal(size=(num + 1, rows + 2, out_dim))
    g = np.einsum("ri,kro->kio", x, d).reshape(num, -1)
    h = np.einsum("ri,kro->kio", y, e).reshape(num + 1, -1)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    np.testing.assert_allclose(L.dense_gramian(f32(x), f32(d)), g @ g.T, rtol=2e-4, atol=1e-3)
    np.testing.assert_allclose(L.dense_gramian(f32(x), f32(d), f32(y), f32(e)), g @ h.T, rtol=2e-4, atol=1e-3)


class ReusedDense(nn.Module):
    """One shared Dense called on two inputs (a kernel with two calls), a Dense on tokens [B, N, d]
    and a LayerNorm (a leaf no Dense covers)."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(12, name="shared_dense")
        h = jnp.tanh(shared(x)) + jnp.tanh(shared(x[:, ::-1]))
        tokens = nn.LayerNorm()(h.reshape(h.shape[0], 3, 4))
        out = nn.Dense(5, use_bias=False)(tokens)
        return out.reshape(out.shape[0], -1)


def _check_against_materialised(forward, params, shared_of, num_tasks):
    def materialised(p):
        _, vjp_fn = jax.vjp(forward, p)
        jac = jax.vmap(lambda c: shared_of(vjp_fn(c)[0]))(jnp.eye(num_tasks))
        return gramian(jac)

    def layerwise(p):
        _, _, rows_fn = L.vjp_and_layerwise_gramian(forward, p, shared_of)
        return L.layerwise_gramian(rows_fn(jnp.eye(num_tasks)))

    want = jax.jit(materialised)(params)
    got = jax.jit(layerwise)(params)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))
    return want


def test_reused_kernel_token_inputs_and_uncovered_leaves_give_the_materialised_gramian():
    model = ReusedDense()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(7, 8)), jnp.float32)
    targets = jnp.asarray(rng.normal(size=(4, 7, 15)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    forward = lambda p: jnp.mean((model.apply({"params": p}, x)[None] - targets) ** 2, axis=(1, 2)) * jnp.arange(1, 5)
    _check_against_materialised(forward, params, lambda p: p, 4)
    calls = []
    original = L._tapped

    def spy(*args):
        out = original(*args)
        calls.append(out[1])
        return out

    L._tapped = spy
    try:
        L.vjp_and_layerwise_gramian(forward, params)
    finally:
        L._tapped = original
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    found = [(paths[c.kernel], None if c.bias is None else paths[c.bias]) for c in calls[0]]
    assert found == [("['shared_dense']['kernel']", "['shared_dense']['bias']")] * 2 + [("['Dense_0']['kernel']", None)]


@pytest.mark.parametrize("name,trunk", [("hps", "lenet"), ("hps", "vit"), ("mmoe", "mlp")])
def test_library_models_give_the_materialised_gramian(name, trunk):
    """LeNet (convolutions uncovered, its dense layers covered), a ViT (token Dense layers; attention
    projections and norms uncovered) and MMoE (experts inside a lifted scan: uncovered; gates
    covered), the whole training forward's shared part, dropout on."""
    tasks = [T.classification(f"t{k}", 4) for k in range(3)]
    kwargs = {"lenet": {}, "vit": dict(patch_size=7, dim=16, depth=2, num_heads=2, mlp_dim=32, dropout=0.1), "mlp": dict(features=(16,))}[trunk]
    cfg = ConfigDict(dict(name=name, trunk=trunk, trunk_kwargs=kwargs, head="linear", head_kwargs={},
                          arch_kwargs={"num_experts": 3} if name == "mmoe" else {}))
    model = build_model(cfg, tasks)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 28, 28, 1) if trunk != "mlp" else (6, 10)), jnp.float32)
    labels = {f"t{k}": jnp.asarray(rng.integers(0, 4, 6)) for k in range(3)}
    params = model.init(jax.random.key(0), x)["params"]
    forward_fn = make_forward(model, tasks, "x")
    batch = {"x": x, **labels}
    forward = lambda p: forward_fn(p, {}, batch, jax.random.key(5), True)[0]
    want = _check_against_materialised(forward, params, lambda p: p["shared"], 3)
    assert np.abs(want).max() > 0


def test_layerwise_gramian_holds_no_jacobian_rows_for_a_covered_wide_layer():
    """On a wide Dense layer with few rows, eq. (1) applies: the compiled step holds no [K, i, o]
    array of per-task kernel gradients (the materialised route does)."""
    model = nn.Dense(48)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 64)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    forward = lambda p: jnp.mean(model.apply({"params": p}, x)[None] * jnp.arange(1.0, 6.0)[:, None, None] ** 2,
                                 axis=(1, 2)) ** 2

    def layerwise(p):
        _, _, rows_fn = L.vjp_and_layerwise_gramian(forward, p)
        return L.layerwise_gramian(rows_fn(jnp.eye(5)))

    def materialised(p):
        _, vjp_fn = jax.vjp(forward, p)
        return gramian(jax.vmap(lambda c: vjp_fn(c)[0])(jnp.eye(5)))

    np.testing.assert_allclose(jax.jit(layerwise)(params), jax.jit(materialised)(params), rtol=1e-4, atol=1e-9)
    hlo = lambda fn: jax.jit(fn).lower(params).compile().as_text()
    assert "f32[5,64,48]" in hlo(materialised)
    assert "f32[5,64,48]" not in hlo(layerwise)


@pytest.mark.parametrize("method,extra", [("upgrad", ()), ("sdmgrad", ()), ("mgda", ("sharpness.kind='sam'",)),
                                          ("nash_mtl", ("jacobian.chunk=2",)), ("gradnorm", ("method.lr=1.0",))])
def test_layerwise_step_equals_the_materialised_step(method, extra):
    """Two steps: same weights and parameters as 'materialize' (UPGrad; SDMGrad's cross Gramian of
    the half batches; MGDA under SAM; Nash-MTL with two tasks per vmapped VJP; GradNorm, whose
    last-shared-layer Gramian comes from the restricted layer rows)."""
    assert_mode_steps_like_materialize("layerwise", f"method.name='{method}'", *extra)




def test_restricted_layer_rows_give_the_last_shared_layers_gramian():
    """GradNorm's input on the layer-wise path: ``restrict`` to the last shared layer, then its
    Gramian, equals ``J_last J_last^T`` of the materialised Jacobian (kernel and bias of dense_1)."""
    exp = plain_experiment()
    params, batch = init_params(exp), batch_of(0)
    method = recording(wants=("last_shared_gramian",))
    options = gradient_options(exp_config_jacobian(), method, exp.model, jnp.zeros((1, 8)))

    def fed(p):
        losses, vjp_fn, rows_fn = L.vjp_and_layerwise_gramian(lambda q: losses_fn(exp)(q, batch), p,
                                                                lambda q: q["shared"])
        rows = rows_fn(jnp.eye(3))
        _, _, state = task_gradients(method, losses, vjp_fn, method.init(3), jnp.int32(0), jax.random.key(0),
                                       options, layer_rows=rows)
        return state["last_shared_gramian"]

    full = shared_jacobian(exp, params, batch)
    last = full[:, sum(x.size for x in jax.tree.leaves(params["shared"]["dense_0"])):]
    np.testing.assert_allclose(np.asarray(jax.jit(fed)(params)), last @ last.T, rtol=1e-4, atol=1e-7)


class LiftedDense(nn.Module):
    """Dense layers inside lifted transforms whose parameters reach the inner call unchanged
    (``nn.vmap`` broadcasting them, ``nn.remat``): their inputs live in the inner trace, so they
    must be left to explicit rows, not tapped."""

    @nn.compact
    def __call__(self, x):
        per_slot = nn.vmap(nn.Dense, variable_axes={"params": None}, split_rngs={"params": False}, in_axes=1,
                           out_axes=1)(6)
        h = jnp.tanh(nn.remat(nn.Dense)(6)(jnp.tanh(per_slot(x))))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


def test_dense_layers_inside_lifted_transforms_fall_back_to_explicit_rows():
    model = LiftedDense()
    x = jnp.asarray(np.random.default_rng(4).normal(size=(5, 4, 7)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    forward = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2, axis=0)
    _check_against_materialised(forward, params, lambda p: p, 3)
