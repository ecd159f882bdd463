"""Sharded (8 fake CPU devices, NamedSharding) == unsharded; bf16 stays bf16; the registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mtl_jax.merging import (
    MERGE_METHODS,
    consensus_merging,
    dare_merging,
    emr_merging,
    get_merge_method,
    iso_cts_merging,
    lines_merging,
    model_stock,
    tall_mask_compress,
    task_arithmetic,
    ties_merging,
)

from .helpers import flat, jit_merge


@pytest.fixture(scope="module")
def meshes():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS must be set before jax is imported")
    return {
        "auto": jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,)),
        "explicit": jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,)),
    }


def shard(tree, mesh):
    """Every leaf split along its first axis over the 8 devices (all test dims are multiples of 8)."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, P("x"))), tree)


SHARDED_CASES = {
    "task_arithmetic": functools.partial(task_arithmetic, lam=0.3),
    "dare_ta": functools.partial(dare_merging, p=0.5, lam=0.3, key=jax.random.key(0, impl="rbg")),
    "ties_global_threshold": functools.partial(ties_merging, top_k=0.2, lam=1.0),
    "consensus_ta": functools.partial(consensus_merging, k=2, tall_lambda=0.4),
    "lines_ta": functools.partial(lines_merging, beta=0.5, base="ta"),  # global L1 norms
    "tall_compress": tall_mask_compress,
    "emr": emr_merging,
    "iso_cts": iso_cts_merging,
    "model_stock": model_stock,
}
# Element-wise merges (a leaf's output entry depends on the same entry of the inputs, global scalars
# aside) keep the inputs' sharding: no gather of a whole leaf onto one device.
KEEP_SHARDING = ["task_arithmetic", "dare_ta", "ties_global_threshold", "consensus_ta", "lines_ta"]
# Explicit-axis meshes reject ambiguous reshapes/SVDs of sharded leaves; these cases exercise the
# per-leaf gather (`replicate_if_explicit`) and the global threshold.
EXPLICIT_CASES = ["ties_global_threshold", "tall_compress", "emr", "iso_cts", "model_stock"]
_UNSHARDED = {}  # name -> unsharded result, shared by the Auto and Explicit cases


@pytest.mark.parametrize(
    "mode,name", [("auto", n) for n in sorted(SHARDED_CASES)] + [("explicit", n) for n in EXPLICIT_CASES]
)
def test_sharded_merge_equals_unsharded(models, meshes, mode, name):
    p0, fts = models
    fn = jax.jit(SHARDED_CASES[name])
    if name not in _UNSHARDED:
        _UNSHARDED[name] = fn(p0, fts)
    want = _UNSHARDED[name]
    mesh = meshes[mode]
    p0_s, fts_s = shard(p0, mesh), [shard(f, mesh) for f in fts]
    assert len(jax.tree_util.tree_leaves(p0_s)[0].sharding.device_set) == 8
    got = fn(p0_s, fts_s)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.dtype == jnp.uint8:
            np.testing.assert_array_equal(g, w)  # bit-packed masks identical
        else:
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    if mode == "auto" and name in KEEP_SHARDING:
        for g, p in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(p0_s)):
            assert g.sharding.is_equivalent_to(p.sharding, g.ndim), (name, g.sharding, p.sharding)


def _bf16(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)


def _extra_args(name, fts):
    if name == "dare":
        return {"key": jax.random.key(0, impl="rbg")}
    if name == "fisher":
        return {"fishers": [jax.tree_util.tree_map(jnp.abs, f) for f in fts]}
    if name == "regmean":
        return {"grams": [{"shared/block_2/Dense_0/kernel": jnp.eye(8, dtype=jnp.bfloat16)} for _ in fts]}
    return {}


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_every_method_keeps_structure_and_bf16(models, name):
    p0, fts = models
    p0, fts = _bf16(p0), [_bf16(f) for f in fts]
    if name == "slerp":
        fts = fts[:2]
    out = jax.eval_shape(functools.partial(MERGE_METHODS[name], **_extra_args(name, fts)), p0, fts)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(p0)
    for o, p in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(p0)):
        assert o.dtype == jnp.bfloat16 and o.shape == p.shape


def test_bf16_values_accumulate_in_fp32(models):
    p0, fts = models
    p0_b, fts_b = _bf16(p0), [_bf16(f) for f in fts]
    up = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    fn = jit_merge(task_arithmetic, lam=0.3)
    out = fn(p0_b, fts_b)
    ref = fn(up(p0_b), [up(f) for f in fts_b])  # same arithmetic on fp32 copies of the inputs
    for o, r in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        assert o.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(r.astype(jnp.bfloat16), np.float32))
    # small task vectors next to a large one: their fp32 sum 1 + 4 * 2**-9 = 1 + 2**-7 is a bf16 number, while
    # bf16 additions round each 2**-9 away next to 1.0 (spacing 2**-7)
    p0 = {"w": jnp.zeros((4,), jnp.bfloat16)}
    fts = [{"w": jnp.full((4,), v, jnp.bfloat16)} for v in (1.0, 2**-9, 2**-9, 2**-9, 2**-9)]
    in_bf16 = functools.reduce(jnp.add, [f["w"] for f in fts])  # adding in the leaf dtype, one model at a time
    assert in_bf16.dtype == jnp.bfloat16 and float(in_bf16[0]) == 1.0
    out = task_arithmetic(p0, fts, lam=1.0)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 1.0 + 2**-7)


def test_registry_lookup_and_error():
    assert get_merge_method("ties") is ties_merging
    with pytest.raises(ValueError, match="valid names: .*task_arithmetic.*ties"):
        get_merge_method("magic")
    assert np.all(flat(get_merge_method("task_arithmetic")({"w": np.zeros(2)}, [{"w": np.ones(2)}], lam=2.0)) == 2.0)
