import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.merging import (
    apply_task_vector,
    check_compatible,
    default_layer_index,
    leaf_paths,
    merge_subset,
    merge_subset_per_task,
    num_layers,
    select_mask,
    task_arithmetic,
    task_vector,
    task_vector_cosines,
)
from mtl_jax.merging.tree import select_flat

from .helpers import flat, random_tree


def test_leaf_paths_are_slash_joined():
    tree = {"shared": {"Dense_0": {"kernel": np.zeros((2, 3))}}, "layers": [np.zeros(2), np.zeros(1)]}
    assert leaf_paths(tree) == ["layers/0", "layers/1", "shared/Dense_0/kernel"]
    flat_dict = {"model.layers.3.mlp.weight": np.zeros(2)}
    assert leaf_paths(flat_dict) == ["model.layers.3.mlp.weight"]


@pytest.mark.parametrize(
    "path,index",
    [
        ("encoder/block_3/Dense_0/kernel", 3),
        ("Encoder_0/Block_11/mlp/kernel", 11),
        ("model.layers.7.self_attn.q_proj.weight", 7),
        ("bert/encoder/layer_2/attention/kernel", 2),
        ("Transformer/encoderblock_5/MlpBlock_0/Dense_1/kernel", 5),
        ("layers_4/kernel", 4),
        ("layers/6/kernel", 6),
        ("MlpBlock_0/Dense_0/kernel", None),
        ("embedding/kernel", None),
        ("layer_norm/scale", None),
        ("head/kernel", None),
    ],
)
def test_default_layer_index(path, index):
    assert default_layer_index(path) == index


def test_num_layers_from_tree():
    tree = {"block_0": {"k": 1.0}, "block_4": {"k": 1.0}, "head": {"k": 1.0}}
    assert num_layers(tree) == 5
    assert num_layers({"head": 1.0}) == 0


def test_shape_mismatch_names_path_and_both_shapes():
    p0 = {"shared": {"Dense_0": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}}
    bad = {"shared": {"Dense_0": {"kernel": np.zeros((4, 5)), "bias": np.zeros(3)}}}
    with pytest.raises(ValueError, match=r"shared/Dense_0/kernel.*\(4, 3\).*\(4, 5\)"):
        task_vector(bad, p0)
    with pytest.raises(ValueError, match=r"shared/Dense_0/kernel.*\(4, 3\).*\(4, 5\)"):
        task_arithmetic(p0, [p0, bad])


def test_structure_mismatch_names_missing_and_extra_paths():
    p0 = {"shared": {"kernel": np.zeros(2)}, "heads": {"a": np.zeros(2)}}
    other = {"shared": {"kernel": np.zeros(2)}, "heads": {"b": np.zeros(2)}}
    with pytest.raises(ValueError, match=r"missing \['heads/a'\].*unexpected \['heads/b'\]"):
        check_compatible(p0, [other])
    with pytest.raises(ValueError, match="finetuned\\[1\\]"):
        task_arithmetic(p0, [p0, other])


def test_task_vector_roundtrip_and_dtype():
    rng = np.random.default_rng(1)
    p0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), random_tree(rng))
    ft = jax.tree_util.tree_map(lambda x: (x.astype(jnp.float32) + 0.5).astype(jnp.bfloat16), p0)
    tau = task_vector(ft, p0)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(tau))
    back = apply_task_vector(p0, tau, 1.0)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(ft)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_select_mask_regex_fullmatch():
    tree = {"shared": {"a": 1.0, "b": 2.0}, "heads": {"x": 3.0}}
    mask = select_mask(tree, include="shared/.*", exclude=".*/b")
    assert mask == {"shared": {"a": True, "b": False}, "heads": {"x": False}}
    # fullmatch: "shared" alone does not select "shared/a"
    assert select_flat(tree, include="shared") == {}


def test_merge_subset_keeps_pretrained_elsewhere(models):
    p0, fts = models
    out = merge_subset(task_arithmetic, p0, fts, include="shared/.*", lam=0.5)
    ref = task_arithmetic(p0, fts, lam=0.5)
    np.testing.assert_allclose(out["shared"]["block_1"]["Dense_0"]["kernel"], ref["shared"]["block_1"]["Dense_0"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(out["heads"]["cls"]["kernel"], p0["heads"]["cls"]["kernel"])


def test_merge_subset_per_task_keeps_each_head(models):
    p0, fts = models
    outs = merge_subset_per_task(task_arithmetic, p0, fts, include="shared/.*", lam=0.3)
    ref = task_arithmetic(p0, fts, lam=0.3)
    assert len(outs) == 3
    for t, out in enumerate(outs):
        np.testing.assert_array_equal(out["heads"]["cls"]["bias"], fts[t]["heads"]["cls"]["bias"])
        np.testing.assert_allclose(out["shared"]["embed"]["embedding"], ref["shared"]["embed"]["embedding"], rtol=1e-6)


def test_flat_safetensors_style_dict():
    rng = np.random.default_rng(2)
    p0 = {"model.layers.0.w": rng.normal(size=(3, 3)).astype(np.float32), "lm_head.w": rng.normal(size=(3,)).astype(np.float32)}
    fts = [{k: v + 1.0 for k, v in p0.items()}, {k: v - 3.0 for k, v in p0.items()}]
    out = task_arithmetic(p0, fts, lam=0.5)
    np.testing.assert_allclose(out["model.layers.0.w"], p0["model.layers.0.w"] - 1.0, rtol=1e-6)


def test_nnx_state_merges_like_linen_params():
    """An ``nnx.State`` is a pytree: methods return a State, leaves are named like linen's (the
    Variable's ``.value`` is dropped), errors name the path, and ``nnx.update`` takes the result."""
    from flax import nnx

    from mtl_jax.merging import get_merge_method

    def model(seed):
        return nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(seed)), nnx.Linear(6, 3, rngs=nnx.Rngs(seed + 10)))

    states = [nnx.state(model(s), nnx.Param) for s in range(4)]
    p0, fts = states[0], states[1:]
    assert leaf_paths(p0) == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
    assert [default_layer_index(p) for p in leaf_paths(p0)] == [0, 0, 1, 1]
    as_dict = lambda s: jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(s))  # noqa: E731
    for name in ("task_arithmetic", "ties", "tsv", "lines"):
        merged = get_merge_method(name)(p0, fts)
        assert isinstance(merged, nnx.State), name
        expected = get_merge_method(name)(as_dict(p0), [as_dict(f) for f in fts])
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                               as_dict(merged), expected)
    target = model(0)
    nnx.update(target, task_arithmetic(p0, fts, lam=0.5))
    kernels = [as_dict(s)["layers"][1]["kernel"] for s in states]
    np.testing.assert_allclose(target.layers[1].kernel[...], kernels[0] + 0.5 * sum(k - kernels[0] for k in kernels[1:]),
                               rtol=1e-5, atol=1e-6)
    bad = nnx.state(nnx.Sequential(nnx.Linear(4, 7, rngs=nnx.Rngs(0)), nnx.Linear(7, 3, rngs=nnx.Rngs(1))), nnx.Param)
    with pytest.raises(ValueError, match=r"layers/0/bias.*\(6,\).*\(7,\)"):
        task_arithmetic(p0, [bad])


def test_task_vector_cosines_match_flattened_reference():
    rng = np.random.default_rng(5)
    base = random_tree(rng)
    # task 2 is task 0 scaled (cosine 1), task 3 its negative (cosine -1)
    taus = [base, random_tree(rng), jax.tree_util.tree_map(lambda x: 2.5 * x, base),
            jax.tree_util.tree_map(lambda x: -x, base)]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *taus)
    rows = np.stack([flat(t) for t in taus])
    norms = np.linalg.norm(rows, axis=1)
    expected = rows @ rows.T / np.outer(norms, norms)
    cos = np.asarray(task_vector_cosines(stacked))
    np.testing.assert_allclose(cos, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([cos[0, 2], cos[0, 3]], [1.0, -1.0], rtol=1e-5)


def test_methods_take_a_dict_of_models_in_its_order_and_refuse_a_single_model():
    """``finetuned`` as ``{task: params}`` gives the list result (values in order), for methods that
    stack task vectors, iterate the models, or count them; one model alone is refused."""
    from mtl_jax.merging import MERGE_METHODS, apply, as_stacked, emr_merging, task_arithmetic_vector

    pre = random_tree(np.random.default_rng(0))
    fts = [random_tree(np.random.default_rng(i)) for i in (1, 2, 3)]
    named = dict(zip(("c", "a", "b"), fts))
    for name in ("weight_average", "task_arithmetic", "ties", "tsv", "model_stock", "consensus"):
        got, want = MERGE_METHODS[name](pre, named), MERGE_METHODS[name](pre, fts)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(g, w, err_msg=name)
    emr = emr_merging(pre, named)
    np.testing.assert_array_equal(emr.rescalers, emr_merging(pre, fts).rescalers)
    with pytest.raises(ValueError, match="finetuned is one model with the pretrained structure"):
        task_arithmetic(pre, fts[0])
    # task vectors: stacked by as_stacked, merged by the *_vector functions, applied by apply
    taus = [task_vector(f, pre) for f in fts]
    merged = apply(pre, task_arithmetic_vector(as_stacked(taus, pre), 0.3))
    for g, w in zip(jax.tree.leaves(merged), jax.tree.leaves(task_arithmetic(pre, named, lam=0.3))):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
