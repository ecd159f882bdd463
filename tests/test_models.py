"""Models: the {'shared', 'heads'} parameter convention, outputs per task, clear build errors."""

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from mtl_jax import tasks as T
from mtl_jax.models import build_model

TASKS = (T.classification("a", 10), T.classification("b", 3), T.regression("c", 2))


@pytest.mark.parametrize("trunk,kwargs", [("mlp", {"features": (16,)}), ("lenet", {}),
                                          ("vit", {"dim": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32})])
def test_param_tree_convention_and_outputs(trunk, kwargs):
    cfg = ml_collections.ConfigDict(dict(name="hps", trunk=trunk, trunk_kwargs=kwargs, head="mlp",
                                         head_kwargs={"hidden": (8,)}))
    model = build_model(cfg, TASKS)
    x = jnp.zeros((2, 28, 28, 1), jnp.uint8)
    params = model.init(jax.random.key(0), x)["params"]
    assert set(params) == {"shared", "heads"} and set(params["heads"]) == {"a", "b", "c"}
    out = model.apply({"params": params}, x)
    assert {k: v.shape for k, v in out.items()} == {"a": (2, 10), "b": (2, 3), "c": (2, 2)}
    # Heads are independent: changing head 'a' leaves the other predictions unchanged.
    other = jax.tree.map(lambda p: p + 1.0, params["heads"]["a"])
    out2 = model.apply({"params": {**params, "heads": {**params["heads"], "a": other}}}, x + 7)
    out1 = model.apply({"params": params}, x + 7)
    assert not jnp.allclose(out1["a"], out2["a"])
    assert jnp.allclose(out1["b"], out2["b"]) and jnp.allclose(out1["c"], out2["c"])


def test_vit_blocks_are_indexed():
    cfg = ml_collections.ConfigDict(dict(name="hps", trunk="vit", trunk_kwargs={"depth": 3, "dim": 16, "num_heads": 2},
                                         head="linear", head_kwargs={}))
    params = build_model(cfg, TASKS[:1]).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    assert {"block_0", "block_1", "block_2"} <= set(params["shared"])


def test_build_errors_name_the_problem():
    base = dict(name="hps", trunk="lenet", trunk_kwargs={}, head="mlp", head_kwargs={})
    with pytest.raises(ValueError, match=r"unknown model 'mmoe_x'; valid names: \[.*'hps'.*\]"):
        build_model(ml_collections.ConfigDict({**base, "name": "mmoe_x"}), TASKS)
    with pytest.raises(ValueError, match=r"unknown trunk 'resnet'; valid names: \[.*'lenet', 'mlp', 'resnet18', 'resnet50', 'vit'.*\]"):
        build_model(ml_collections.ConfigDict({**base, "trunk": "resnet"}), TASKS)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\] for trunk 'lenet'.*width"):
        build_model(ml_collections.ConfigDict({**base, "trunk_kwargs": {"depth": 3}}), TASKS)
    with pytest.raises(ValueError, match="unknown kind 'dense'"):
        T.TaskSpec("seg", "dense", 3)


@pytest.mark.parametrize("head,head_kwargs", [("linear", {}), ("mlp", {"hidden": (8, 6)})])
def test_copies_of_one_head_run_as_one_vmapped_head_with_unchanged_params_outputs_and_gradients(
        head, head_kwargs, monkeypatch):
    from mtl_jax.models import multitask

    cfg = ml_collections.ConfigDict(dict(name="hps", trunk="mlp", trunk_kwargs={"features": (16,)}, head=head,
                                         head_kwargs=head_kwargs))
    model = build_model(cfg, tuple(T.classification(n, 5) for n in "abc"))
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    params = model.init(jax.random.key(0), x)["params"]
    h = model.apply({"params": params}, x, stage="trunk")
    copies = {t: h * (k + 1) for k, t in enumerate("abc")}

    def outputs(p):
        return (model.apply({"params": p}, x), model.apply({"params": p}, copies, stage="heads", per_task=True),
                jax.grad(lambda p: sum(jnp.sum(v ** 2) for v in model.apply({"params": p}, x).values()))(p))

    stacked = outputs(params)
    layers = 1 + len(head_kwargs.get("hidden", ()))
    dots = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params)).count("dot_general")
    assert dots == 1 + layers  # trunk + one matmul per head layer for all three heads
    # Heads of different sizes are not stacked, nor are two heads (MIN_STACKED_HEADS).
    assert not multitask.stackable(build_model(cfg, (T.classification("a", 5), T.classification("b", 3),
                                                     T.classification("c", 5))).heads)
    assert not multitask.stackable(build_model(cfg, (T.classification("a", 5), T.classification("b", 5))).heads)
    monkeypatch.setattr(multitask, "stackable", lambda heads: False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), model.init(jax.random.key(0), x)["params"],
                                     params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stacked, outputs(params))
