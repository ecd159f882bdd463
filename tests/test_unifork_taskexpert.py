"""UniFork (Y-shaped ViT) and TaskExpert (experts, per-task gates, multi-task feature memory)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mtl_jax import tasks as T
from mtl_jax.data import get_dataset
from mtl_jax.data.sources import read_all
from mtl_jax.models import build_model
from mtl_jax.models.heads import LinearHead
from mtl_jax.models.multitask import HardParameterSharing
from mtl_jax.models.trunks import ViT
from mtl_jax.train.forward import make_task_losses

TASKS = (T.classification("a", 10), T.classification("b", 3))
VIT = {"patch_size": 2, "dim": 8, "depth": 2, "num_heads": 2, "mlp_dim": 16}
X = jax.random.uniform(jax.random.key(0), (2, 4, 4, 1))  # 4 tokens


def config(name, trunk="vit", **arch_kwargs):
    return ml_collections.ConfigDict(dict(name=name, trunk=trunk, trunk_kwargs=VIT if trunk == "vit" else {},
                                          head="linear", head_kwargs={}, arch_kwargs=arch_kwargs))


def test_unifork_limits_are_hps_and_separate_networks():
    """shared_depth = depth is HPS on the ViT (same tree, same function); shared_depth = 0 is one ViT
    per task (sharing only the embedding). Eager: the per-op compilations are shared between tests."""
    all_shared = build_model(config("unifork", shared_depth=2), TASKS)
    forked = build_model(config("unifork", shared_depth=0), TASKS)
    hps = HardParameterSharing(ViT(**VIT), {t.name: LinearHead(t.num_outputs) for t in TASKS})
    vit, names = ViT(**VIT), ("a", "b")

    def compare(key):
        p = all_shared.init(key, X)["params"]
        out = all_shared.apply({"params": p}, X)
        ref = hps.apply({"params": {"shared": p["shared"], "heads": {t: p["heads"][t]["head"] for t in names}}}, X)
        q = forked.init(key, X)["params"]
        out0 = forked.apply({"params": q}, X)
        ref0 = {t.name: LinearHead(t.num_outputs).apply(
            {"params": q["heads"][t.name]["head"]},
            vit.apply({"params": {**q["shared"], **{k: v for k, v in q["heads"][t.name].items() if k != "head"}}}, X))
            for t in TASKS}
        bumped = {**q, "heads": {**q["heads"], "a": jax.tree.map(lambda v: v + 0.1, q["heads"]["a"])}}
        return p, out, ref, q, out0, ref0, forked.apply({"params": bumped}, X)

    p, out, ref, q, out0, ref0, out_bumped = compare(jax.random.key(1))
    hps_params = jax.eval_shape(hps.init, jax.random.key(1), X)["params"]
    assert jax.tree.structure(p) == jax.tree.structure({
        "shared": hps_params["shared"], "heads": {t: {"head": hps_params["heads"][t]} for t in names}})
    assert set(q["shared"]) == {"patch_embed", "pos_embed"}
    assert set(q["heads"]["a"]) == {"block_0", "block_1", "ln_final", "head"}
    for t in names:
        np.testing.assert_allclose(out[t], ref[t], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out0[t], ref0[t], rtol=1e-5, atol=1e-6)
    assert not jnp.allclose(out0["a"], out_bumped["a"]) and jnp.array_equal(out0["b"], out_bumped["b"])


def test_unifork_fork_point_and_errors():
    model = build_model(config("unifork", shared_depth=1), TASKS)
    shapes = jax.eval_shape(model.init, jax.random.key(1), X)["params"]
    assert set(shapes["shared"]) == {"patch_embed", "pos_embed", "block_0"}
    assert set(shapes["heads"]["b"]) == {"block_1", "ln_final", "head"}  # global block index
    with pytest.raises(ValueError, match=r"shared_depth=3 must lie in \[0, depth=2\]"):
        jax.eval_shape(build_model(config("unifork", shared_depth=3), TASKS).init, jax.random.key(1), X)
    with pytest.raises(ValueError, match="UniFork forks a ViT; got trunk LeNet"):
        jax.eval_shape(build_model(config("unifork", trunk="lenet"), TASKS).init, jax.random.key(1), X)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['split'\] for model 'unifork'; valid options: "
                                         r"\['shared_depth'\]"):
        build_model(config("unifork", split=1), TASKS)


def test_taskexpert_gates_and_memory():
    models = {g: build_model(config("taskexpert", num_experts=3, expert_dim=8, gating=g), TASKS)
              for g in ("token", "sample")}

    def force_memory(params):
        """Task a's layer-1 gate puts all its weight on the memory expert."""
        gate = params["heads"]["a"]["gate_1"]
        forced = {"kernel": jnp.zeros_like(gate["kernel"]), "bias": jnp.array([-1e4, -1e4, -1e4, 1e4])}
        return {**params, "heads": {**params["heads"], "a": {**params["heads"]["a"], "gate_1": forced}}}

    def run(key):
        out = {}
        for g, model in models.items():
            params = model.init(key, X)["params"]
            preds, state = model.apply({"params": params}, X, mutable=["intermediates"])
            _, forced = model.apply({"params": force_memory(params)}, X, mutable=["intermediates"])
            out[g] = (params, preds, state["intermediates"]["heads"], forced["intermediates"]["heads"]["a"])
        return out

    for gating, (params, preds, recorded, forced) in run(jax.random.key(1)).items():
        assert params["shared"]["experts_1"]["hidden"]["kernel"].shape == (3, 8, 8)  # [E, D, hidden]
        assert {k: v.shape for k, v in preds.items()} == {"a": (2, 10), "b": (2, 3)}
        for task in ("a", "b"):
            rec = {k: v[0] for k, v in recorded[task].items()}
            for level in range(2):
                gates = rec[f"gate_weights_{level}"]  # E experts + the memory, per token or per sample
                assert gates.shape == ((2, 4, 4) if gating == "token" else (2, 4)) and jnp.all(gates >= 0)
                np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-6)
                assert rec[f"memory_{level}"].shape == (2, 4, 8)
            # Memory write: M_0 = 0 + T_0, M_1 = M_0 + T_1.
            np.testing.assert_allclose(rec["memory_0"], rec["task_feature_0"], atol=1e-6)
            np.testing.assert_allclose(rec["memory_1"], rec["memory_0"] + rec["task_feature_1"], rtol=1e-5,
                                       atol=1e-6)
        # Memory read: a gate with all weight on the memory expert copies the memory into the feature.
        rec = {k: v[0] for k, v in forced.items()}
        np.testing.assert_allclose(rec["task_feature_1"], rec["memory_0"], atol=1e-6)
        np.testing.assert_allclose(rec["memory_1"], 2 * rec["memory_0"], rtol=1e-5, atol=1e-6)


def test_taskexpert_bad_options():
    with pytest.raises(ValueError, match=r"unknown TaskExpert gating 'pixel'; valid names: \['sample', 'token'\]"):
        jax.eval_shape(build_model(config("taskexpert", gating="pixel"), TASKS).init, jax.random.key(1), X)
    with pytest.raises(ValueError, match="TaskExpert needs a ViT backbone; got trunk LeNet"):
        jax.eval_shape(build_model(config("taskexpert", trunk="lenet"), TASKS).init, jax.random.key(1), X)


@pytest.mark.parametrize("name,arch_kwargs", [("unifork", {"shared_depth": 1}),
                                              ("taskexpert", {"num_experts": 2, "expert_dim": 16})])
def test_smoke_training_on_digits_beats_chance(name, arch_kwargs):
    """100 Adam steps on real 8x8 digits (digit + parity) with a hand-written jitted step (the
    trainer itself runs these configs in tests/test_train.py)."""
    dataset = get_dataset(ml_collections.ConfigDict(dict(name="digits", seed=0, tasks=("digit", "parity"))))
    model = build_model(ml_collections.ConfigDict(dict(
        name=name, trunk="vit", trunk_kwargs={**VIT, "dim": 16, "mlp_dim": 32}, head="linear", head_kwargs={},
        arch_kwargs=arch_kwargs)), dataset.tasks)
    train, test = (read_all(dataset.splits[s]) for s in ("train", "test"))
    losses = make_task_losses(dataset.tasks)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: losses(model.apply({"params": p}, batch["image"]), batch).sum())(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.init(jax.random.key(0), train["image"][:1])["params"]
    opt_state = tx.init(params)
    order = np.random.default_rng(0).permutation(len(train["image"]))
    for i in range(100):
        idx = order[(i * 64) % 1408:][:64]
        params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in train.items()})
    preds = model.apply({"params": params}, test["image"])
    accuracy = {t: float((np.argmax(preds[t], -1) == test[t]).mean()) for t in ("digit", "parity")}
    assert accuracy["digit"] > 0.4 and accuracy["parity"] > 0.65, accuracy  # chance: 0.1 / 0.5
