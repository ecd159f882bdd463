"""Task-routed MoE ViTs (M3ViT, Mod-Squad): routing against a loop reference, auxiliary losses in
closed form, single-task forward and exact sub-model extraction, expert-parallel sharding, one
trace per configuration, learning on heterogeneous real data."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtl_jax import tasks as T
from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data import get_dataset
from mtl_jax.data.datasets import one_task_per_example
from mtl_jax.data.pipeline import to_global
from mtl_jax.models import build_model
from mtl_jax.models.heads import LinearHead
from mtl_jax.models.moe_layers import (SparseMoE, capacity, load_balancing_loss, task_expert_entropy,
                                       top_k_routing)
from mtl_jax.models.moe_vit import M3ViT, ModSquad, expert_usage, extract_task_model, kept_experts
from mtl_jax.train.forward import batch_metrics, make_forward, metric_sums
from mtl_jax.train.trainer import build_experiment, evaluate

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
TINY = dict(patch_size=2, dim=16, depth=2, num_heads=2, mlp_dim=16, num_experts=4, top_k=2)


def reference_routing(logits, k, slots):
    """GShard dispatch by explicit loops: choice rank j = 0..k-1, then tokens in order, each taking
    the next free slot of its j-th expert if one is left. Returns (slot [G, T, k] or -1, gates)."""
    groups, tokens, _ = logits.shape
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logits, order, -1)
    gates = np.exp(top - top.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    slot = -np.ones((groups, tokens, k), int)
    for g in range(groups):
        fill = {}
        for j in range(k):
            for t in range(tokens):
                e = order[g, t, j]
                if fill.get(e, 0) < slots:
                    slot[g, t, j] = fill.get(e, 0)
                    fill[e] = fill.get(e, 0) + 1
    return order, slot, gates


def test_top_k_routing_and_moe_layer_match_loop_references():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 10, 5)))
    k, slots = 2, capacity(10, 5, 2, 0.75)  # 3 slots for 20 choices over 5 experts: drops happen
    routing = jax.jit(top_k_routing, static_argnums=(1, 2))(jnp.asarray(logits), k, slots)
    order, slot, gates = reference_routing(logits, k, slots)
    expected = np.zeros((3, 10, k, 5, slots))
    for g, t, j in np.ndindex(3, 10, k):
        if slot[g, t, j] >= 0:
            expected[g, t, j, order[g, t, j], slot[g, t, j]] = 1
    assert (slot < 0).any()  # some tokens over capacity
    np.testing.assert_array_equal(np.asarray(routing.choice_slots), expected)
    np.testing.assert_array_equal(np.asarray(routing.kept), slot >= 0)
    np.testing.assert_allclose(np.asarray(routing.gates), gates, rtol=1e-6)
    # The layer: y_t = sum over the token's kept choices of gate * expert_e(x_t).
    x = jax.random.normal(jax.random.key(1), (3, 10, 6))
    layer = SparseMoE(num_experts=5, hidden_dim=7, top_k=k, capacity_factor=0.75)
    params = jax.jit(layer.init)(jax.random.key(2), x, jnp.asarray(logits))["params"]
    y, _ = jax.jit(layer.apply)({"params": params}, x, jnp.asarray(logits))
    p = jax.tree.map(np.asarray, params["experts"])
    gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))  # flax's default gelu
    expert = lambda e, v: gelu(v @ p["w_in"][e] + p["b_in"][e]) @ p["w_out"][e] + p["b_out"][e]
    want = np.zeros((3, 10, 6))
    for g, t, j in np.ndindex(3, 10, k):
        if slot[g, t, j] >= 0:
            want[g, t] += gates[g, t, j] * expert(order[g, t, j], np.asarray(x[g, t]))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


def test_group_size_routes_runs_of_tokens_as_their_own_groups():
    """group_size=g on [B, T, D] == one group per g consecutive tokens ([B * T / g, g, D], group_size 0)."""
    x = jax.random.normal(jax.random.key(1), (2, 12, 6))
    logits = jax.random.normal(jax.random.key(0), (2, 12, 5))
    grouped = SparseMoE(num_experts=5, hidden_dim=7, top_k=2, capacity_factor=0.75, group_size=4)
    whole = SparseMoE(num_experts=5, hidden_dim=7, top_k=2, capacity_factor=0.75)
    params = jax.jit(grouped.init)(jax.random.key(2), x, logits)
    y, routing = jax.jit(grouped.apply)(params, x, logits)
    want, want_routing = jax.jit(whole.apply)(params, x.reshape(6, 4, 6), logits.reshape(6, 4, 5))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want).reshape(2, 12, 6))
    assert routing.dispatch.shape == (2, 12, 5, capacity(4, 5, 2, 0.75))
    np.testing.assert_array_equal(np.asarray(routing.kept), np.asarray(want_routing.kept).reshape(2, 12, 2))
    # Whole-sequence routing differs (one capacity over 12 tokens).
    assert not np.array_equal(np.asarray(jax.jit(whole.apply)(params, x, logits)[0]), np.asarray(y))
    with pytest.raises(ValueError, match="group_size=5 must divide the 12 tokens"):
        SparseMoE(num_experts=5, hidden_dim=7, group_size=5).init(jax.random.key(2), x, logits)


def test_aux_losses_closed_forms():
    balance = jax.jit(load_balancing_loss, static_argnums=3)  # numpy inputs, one shape: one compilation each
    entropy = jax.jit(task_expert_entropy)
    ones = np.ones((2, 3), np.float32)
    uniform = np.full((2, 3, 4, 4), 1 / 4, np.float32)
    two_each = np.tile(np.array([1, 1, 0, 0], np.float32), (2, 3, 2, 1))
    two_each = np.concatenate([two_each, two_each[..., ::-1]], axis=2)  # experts {0, 1} and {2, 3}, equally often
    np.testing.assert_allclose(balance(uniform, two_each, ones, 2), [1.0, 1.0], rtol=1e-6)
    collapsed = np.zeros((2, 3, 4, 4), np.float32)
    collapsed[..., 0] = 1.0  # every token on expert 0 with prob 1 (k = 1)
    np.testing.assert_allclose(balance(collapsed, collapsed, ones, 1), [4.0, 4.0], rtol=1e-6)
    # H(T|E): 0 when each task has its own experts, H(T) = log K when all tasks route alike.
    own = np.stack([np.tile(np.array([0.5, 0.5, 0, 0], np.float32), (3, 4, 1)),
                    np.tile(np.array([0, 0, 0.5, 0.5], np.float32), (3, 4, 1))])
    assert float(entropy(own, ones)) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    same = softmax(rng.normal(size=(1, 3, 4, 4))).repeat(2, 0).astype(np.float32)
    assert float(entropy(same, ones)) == pytest.approx(math.log(2), rel=1e-5)
    # Against H(T) - MI from the joint by hand, with task weights (task 1 labels 2 of 3 examples).
    probs = softmax(rng.normal(size=(2, 3, 4, 4))).astype(np.float32)
    weights = np.array([[1.0, 1, 1], [0, 1, 1]], np.float32)
    joint = np.einsum("kb,kbte->ke", weights, probs)
    joint /= joint.sum()
    pt, pe = joint.sum(1), joint.sum(0)
    mi = (joint * np.log(joint / pt[:, None] / pe[None])).sum()
    assert float(entropy(probs, weights)) == pytest.approx(-(pt * np.log(pt)).sum() - mi, rel=1e-5)


def tiny_model(cls=ModSquad, **kwargs):
    return cls(heads={"b": LinearHead(3), "a": LinearHead(5)}, **{**TINY, "num_experts": 8, **kwargs})


def test_single_task_forward_exact_extraction_aux_losses_and_one_trace():
    """One small Mod-Squad (capacity small enough that tokens are dropped), five compilations."""
    tasks = (T.classification("b", 3), T.classification("a", 5))
    model = tiny_model(capacity_factor=0.5)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    # Expert 0 is never chosen by task a's routers: the sub-model must not hold it.
    params["heads"]["a"]["router"] = {b: r.at[:, 0].set(-1e3) for b, r in params["heads"]["a"]["router"].items()}
    run = jax.jit(lambda p, m: model.apply({"params": p}, x, task_mask=m, mutable=["aux_loss"]))
    mask = np.array([[1, 0], [1, 1], [0, 1], [1, 0]], np.float32)
    preds, state = run(params, mask)
    preds = jax.tree.map(np.asarray, preds)

    # Single-task forward: that task's router and head only, the same prediction.
    single = lambda m, p: jax.jit(lambda p, x: m.apply({"params": p}, x, tasks=("a",)))(p, x)
    alone = single(model, params)
    assert set(alone) == {"a"}
    np.testing.assert_allclose(alone["a"], preds["a"], rtol=1e-5, atol=1e-6)  # XLA fuses K = 1 and K = 2 apart

    # Extraction: the experts task a picks on x, bit-for-bit the same predictions, fewer parameters.
    usage = expert_usage(model, {"params": params}, x, "a")
    assert set(usage) == {"block_0", "block_1"} and all(u[0] == 0 and u.sum() == 4 * 16 * 2 for u in usage.values())
    kept = kept_experts(usage, threshold=0.0, top_k=2)
    sub_model, sub_params = extract_task_model(model, params, "a", kept)
    assert set(sub_params["heads"]) == {"a"}
    for block, index in kept.items():
        assert 0 not in index and sub_params["shared"][block]["moe"]["experts"]["w_in"].shape[0] == len(index)
        np.testing.assert_array_equal(sub_params["heads"]["a"]["router"][block],
                                      params["heads"]["a"]["router"][block][:, index])
    np.testing.assert_array_equal(single(sub_model, sub_params)["a"], alone["a"])
    size = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
    assert size(sub_params) < size(params)
    assert all(len(v) >= 2 for v in kept_experts(usage, threshold=0.99, top_k=2).values())  # never < top_k

    # make_forward: losses masked to labelled examples (label -1: another task's example), plus the
    # sown auxiliary losses (per-task load balancing; the MI loss split over the 2 tasks).
    forward = jax.jit(make_forward(model, tasks, "image"), static_argnums=4)
    batch = {"image": x, "b": jnp.array([0, 1, -1, 2]), "a": jnp.array([-1, 4, 3, -1])}
    losses, _ = forward(params, {}, batch, jax.random.key(2), True)
    shifted = lambda z: z - z.max(-1, keepdims=True)
    log_softmax = lambda z: shifted(z) - np.log(np.exp(shifted(z)).sum(-1, keepdims=True))
    ce = lambda logits, y: -log_softmax(logits)[np.arange(len(y)), y]
    masked = [ce(preds["b"][[0, 1, 3]], np.array([0, 1, 2])).mean(), ce(preds["a"][[1, 2]], np.array([4, 3])).mean()]
    aux = state["aux_loss"]["shared"]
    assert set(aux) == {"block_0", "block_1"}
    per_task = sum(aux[b]["load_balance"][0] for b in aux)
    shared = sum(aux[b]["task_expert_entropy"][0] for b in aux)
    np.testing.assert_allclose(losses, np.array(masked) + per_task + shared / 2, rtol=1e-5)
    # Fully labelled batch: plain means (+ the auxiliary losses, here computed on every example).
    full = {"image": x, "b": jnp.array([0, 1, 2, 2]), "a": jnp.array([1, 4, 3, 0])}
    losses_full, _ = forward(params, {}, full, jax.random.key(3), True)
    _, unmasked = run(params, np.ones_like(mask))
    aux_full = unmasked["aux_loss"]["shared"]
    assert not np.allclose(aux_full["block_0"]["load_balance"][0], aux["block_0"]["load_balance"][0])
    plain = np.array([ce(preds["b"], np.asarray(full["b"])).mean(), ce(preds["a"], np.asarray(full["a"])).mean()])
    extra = sum(aux_full[b]["load_balance"][0] + aux_full[b]["task_expert_entropy"][0] / 2 for b in aux_full)
    np.testing.assert_allclose(losses_full, plain + extra, rtol=1e-5)
    assert forward._cache_size() == 1  # new labels and masks, no new trace


def test_metrics_count_only_the_examples_labelled_for_each_task():
    """Train-batch means and evaluation sums / counts skip label -1 (another task's example) and padding."""
    tasks = (T.classification("a", 3), T.classification("b", 3))
    logits = jnp.eye(3)[jnp.array([0, 1, 2, 0])] * 5.0  # predicts 0, 1, 2, 0
    preds = {"a": logits, "b": logits}
    batch = {"a": jnp.array([0, 2, -1, -1]), "b": jnp.array([-1, 1, 2, 1])}
    means = batch_metrics(tasks, preds, batch)
    np.testing.assert_allclose(means["a"]["accuracy"], 0.5)  # 1 of its 2 labelled examples right
    np.testing.assert_allclose(means["b"]["accuracy"], 2 / 3)
    sums, counts = metric_sums(tasks, preds, batch, jnp.array([1.0, 1.0, 1.0, 0.0]))  # last one is padding
    assert float(counts["a"]) == 2 and float(counts["b"]) == 2
    np.testing.assert_allclose([sums["a"]["accuracy"], sums["b"]["accuracy"]], [1.0, 2.0])
    none = batch_metrics(tasks, preds, {"a": -jnp.ones(4, jnp.int32), "b": batch["b"]})
    assert float(none["a"]["accuracy"]) == 0.0 and np.isfinite(float(none["a"]["loss"]))


def test_expert_sharded_moe_layer_matches_unsharded():
    """Experts split over 'expert' (data=2 x expert=4 of the 8 CPU devices): same outputs and gradients."""
    from jax.sharding import NamedSharding

    from mtl_jax.train.sharding import batch_sharding, expert_rules, make_mesh, tree_shardings

    layer = SparseMoE(num_experts=4, hidden_dim=8, top_k=2, capacity_factor=1.0)
    x = jax.random.normal(jax.random.key(0), (8, 6, 5))
    logits = jax.random.normal(jax.random.key(1), (8, 6, 4))
    params = {"moe": jax.jit(layer.init)(jax.random.key(2), x, logits)["params"]}

    def loss(p, x, logits):
        y, routing = layer.apply({"params": p["moe"]}, x, logits)
        return (y ** 2).sum() + (routing.probs * routing.choices).sum(), y

    value_and_grad = jax.value_and_grad(loss, has_aux=True)
    (_, y0), g0 = jax.jit(value_and_grad)(params, x, logits)
    mesh = make_mesh(data=2, expert=4)
    shardings = tree_shardings(params, mesh, expert_rules(params, mesh))
    assert shardings["moe"]["experts"]["w_in"].spec == P("expert", None, None)
    data = batch_sharding(mesh)
    assert data.spec == P(("data", "expert"))
    sharded = jax.jit(value_and_grad, in_shardings=(shardings, data, data),
                      out_shardings=((NamedSharding(mesh, P()), data), shardings))
    (_, y1), g1 = sharded(jax.device_put(params, shardings), jax.device_put(x, data), jax.device_put(logits, data))
    assert {s.data.shape for s in g1["moe"]["experts"]["w_in"].addressable_shards} == {(1, 5, 8)}
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def digits_config(name, *overrides):
    config = load_config(os.path.join(CONFIGS, "digits_mlp.py"))
    config.model.name = name
    config.model.trunk_kwargs = {}
    config.model.arch_kwargs = dict(TINY)
    config.progress_bar = False
    return apply_overrides(config, ["checkpoint.enabled=False", "optim.lr=3e-3"] + list(overrides))


@pytest.mark.slow  # the default tests cover the layer (test_expert_sharded_moe_layer_matches_unsharded)
def test_expert_parallel_step_matches_unsharded_and_compiles_once():
    dataset = get_dataset(digits_config("m3vit").data)
    batches = [{k: np.stack([dataset.splits["train"][64 * i + j][k] for j in range(64)])
                for k in ("image", "digit", "parity", "ink")} for i in range(3)]
    results = []
    for mesh in ((1, 1), (2, 4)):
        # SGD: parameter differences are gradient differences (Adam would blow up float noise on
        # near-zero gradients into lr-sized steps).
        exp = build_experiment(digits_config("m3vit", f"mesh.data={mesh[0]}", f"mesh.expert={mesh[1]}",
                                             "optim.name='sgd'", "optim.lr=0.1", "optim.momentum=0.5"), dataset)
        state = exp.init()
        w_in = state.params["shared"]["block_1"]["moe"]["experts"]["w_in"]
        if mesh[1] > 1:
            assert w_in.sharding.spec == P("expert", None, None)
            assert {s.data.shape for s in w_in.addressable_shards} == {(1,) + w_in.shape[1:]}
            moments = [m for m in jax.tree.leaves(state.opt_state["shared"]) if m.shape == w_in.shape]
            assert moments and all(m.sharding.spec == w_in.sharding.spec for m in moments)  # momentum follows
        for batch in batches:
            state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
        assert exp.train_step._cache_size() == 1  # one trace for the three steps
        results.append((jax.device_get(out["losses"]), jax.device_get(state.params)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_options_fail_clearly():
    cfg = lambda **kw: ml_collections.ConfigDict(dict(name="mod_squad", trunk="lenet", trunk_kwargs={}, head="linear",
                                                      head_kwargs={}, arch_kwargs=kw))
    tasks = [T.classification("a", 3)]
    with pytest.raises(ValueError, match=r"top_k=5 must be between 1 and the number of experts per MoE block \(4\)"):
        build_model(cfg(num_experts=4, top_k=5), tasks)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['experts'\] for model 'mod_squad'.*'num_experts'"):
        build_model(cfg(experts=4), tasks)
    with pytest.raises(ValueError, match=r"mesh axis 'expert' of size 4 does not divide the 6 experts of "
                                         r"'shared/block_1/moe/experts/b_in'"):
        build_experiment(digits_config("m3vit", "mesh.expert=4", "model.arch_kwargs.num_experts=6"))


@pytest.mark.slow  # the default suite trains both configs' smoke runs (tests/test_train.py)
def test_mod_squad_learns_from_one_task_per_example():
    base = get_dataset(digits_config("mod_squad").data).select_tasks(["digit", "parity"])
    dataset = one_task_per_example(base, ratios=(0.7, 0.3), seed=0)
    train = dataset.splits["train"].arrays
    share = (train["digit"] >= 0).mean()
    assert 0.65 < share < 0.75 and np.all((train["digit"] >= 0) != (train["parity"] >= 0))
    assert np.all(dataset.splits["test"].arrays["parity"] >= 0)
    exp = build_experiment(digits_config("mod_squad", "data.tasks=('digit', 'parity')", "mesh.data=1"), dataset)
    state = exp.init()
    keys = ("image", "digit", "parity")
    order = np.random.default_rng(0).permutation(len(train["image"]))
    for step in range(150):
        idx = order[(64 * step) % 1408:][:64]
        state, out = exp.train_step(state, to_global({k: train[k][idx] for k in keys}, exp.data_sharding))
    assert exp.train_step._cache_size() == 1
    res = evaluate(exp.eval_step, state, dataset, "test", 360, exp.data_sharding)
    assert res["digit"]["accuracy"] > 0.5 and res["parity"]["accuracy"] > 0.7, res  # chance: 0.10 / 0.50


def test_expert_width_is_separate_from_the_dense_mlp_width():
    """M3ViT's moe_mlp_ratio: ``expert_mlp_dim`` sets the experts' hidden width, the dense blocks keep mlp_dim."""
    x = jnp.zeros((2, 8, 8, 1))
    for expert_mlp_dim, width in ((0, 20), (24, 24)):
        model = tiny_model(M3ViT, depth=2, mlp_dim=20, expert_mlp_dim=expert_mlp_dim)
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]["shared"]
        dense = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params["block_0"])
                 if leaf.ndim == 2 and "mlp" in jax.tree_util.keystr(path).lower()]
        assert dense and all(20 in shape for shape in dense)
        moe = params["block_1"]["moe"]["experts"]
        assert moe["w_in"].shape == (8, TINY["dim"], width) and moe["w_out"].shape == (8, width, TINY["dim"])


def test_single_task_forward_flops_grow_by_one_pathway_per_task():
    """XLA's FLOPs (``inference_flops`` with ``tasks=``) of the task-routed forward are a shared prefix plus
    one equal pathway per task: F(a, b) - F(a) == F(a, b, c) - F(a, b)."""
    from mtl_jax.models.flops import abstract_variables, inference_flops

    model = M3ViT(heads={t: LinearHead(4) for t in "abc"}, **{**TINY, "depth": 3, "num_experts": 4})
    example = jax.ShapeDtypeStruct((8, 8, 1), jnp.float32)
    variables = abstract_variables(model, jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
    flops = [inference_flops(model, variables, example, 4, tasks=tuple("abc"[:k])) for k in (1, 2, 3)]
    assert flops[1] - flops[0] == pytest.approx(flops[2] - flops[1], rel=0.03)  # XLA fuses K = 2, 3 apart
    assert flops[0] < flops[1] < flops[2] and flops[2] == pytest.approx(inference_flops(model, variables, example, 4))


def test_inference_experiment_measure_records_which_images_chose_the_experts():
    """experiments/moe_inference_flops.measure with calibration images: the kept experts come from
    their routing, not from the evaluated batch, and the table says so."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "moe_inference_flops.py"
    spec = importlib.util.spec_from_file_location("moe_inference_flops", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    model = tiny_model()
    x = np.asarray(jax.random.uniform(jax.random.key(0), (4, 8, 8, 1)))
    other = np.asarray(jax.random.uniform(jax.random.key(5), (6, 8, 8, 1)))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    labels = {"a": np.zeros(4, int), "b": np.zeros(4, int)}
    held_out = experiment.measure(model, params, x, labels, [0.0], repeats=1, calibration=other)
    assert held_out["calibration"] == 6
    usage = held_out["tasks"]["a"]["usage"]
    assert sum(sum(u) for u in usage.values()) == 6 * 16 * model.top_k * len(usage)  # routed on the 6 other images
    table = experiment.markdown("tiny", "test", held_out, {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.5}})
    assert "6 training images (not the batch compared here)" in table
