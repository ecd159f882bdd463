"""MTL architectures (LibMTL's set): parameter-tree convention, outputs, gates, masks, branching."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtl_jax import tasks as T
from mtl_jax.models import MODELS, build_model
from mtl_jax.models.heads import LinearHead
from mtl_jax.models.ltb import ltb_branching, ltb_temperature
from mtl_jax.models.moe import binary_codes, dselect_k_weights, smooth_step
from mtl_jax.models.staged import StagedMLP
from mtl_jax.models.trunks import MLP

TASKS = (T.classification("a", 10), T.classification("b", 3), T.regression("c", 2))
NAMES = ["a", "b", "c"]
ARCHS = ["mmoe", "cgc", "dselect_k", "ple", "mtan", "cross_stitch", "ltb"]
X = jax.random.uniform(jax.random.key(0), (4, 6, 6, 1))


def config(name, trunk="mlp", trunk_kwargs=None, **arch_kwargs):
    return ml_collections.ConfigDict(dict(name=name, trunk=trunk, trunk_kwargs=trunk_kwargs or {"features": (8, 8)},
                                          head="linear", head_kwargs={}, arch_kwargs=arch_kwargs))


def init(model, x=X):
    return model.init(jax.random.key(1), x)


def apply(model, variables, x=X, train=False, mutable=("intermediates",)):
    """(predictions, mutated collections) with the dropout rng the trainer passes (eager: on CPU
    the per-op compilations are shared between tests, cheaper than one jit per test)."""
    return model.apply(variables, x, train=train, rngs={"dropout": jax.random.key(2)}, mutable=list(mutable))


def paths(tree):
    return ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# Options per architecture (two tasks, a and b), and the gate widths (experts per gate) each
# records: CGC's tasks own 1 and 2 experts besides 2 shared ones. Expert counts repeat across
# architectures so that the compiled (vmapped) initialisers are reused between tests.
OPTIONS = {
    "mmoe": ({"num_experts": 3}, {"gate_weights": (3, 3)}),
    "cgc": ({"num_shared_experts": 2, "num_specific_experts": (1, 2)}, {"gate_weights": (3, 4)}),
    "dselect_k": ({"num_experts": 3, "num_nonzeros": 2}, {"gate_weights": (3, 3)}),
    "ple": ({"num_shared_experts": 2, "num_specific_experts": 1}, {"gate_weights_0": (3, 3), "gate_weights_1": (3, 3)}),
    "mtan": ({}, {}), "cross_stitch": ({}, {}), "ltb": ({}, {}),
}


@pytest.mark.parametrize("name", ARCHS)
def test_param_tree_outputs_and_gates(name):
    kwargs, gate_widths = OPTIONS[name]
    model = build_model(config(name, **kwargs), TASKS[:2])
    variables = init(model)
    params = variables["params"]
    assert set(params) == {"shared", "heads"} and set(params["heads"]) == {"a", "b"}
    # Parameters that belong to one task sit under a path naming it (in 'shared' only for the
    # task columns of Cross-stitch / LTB, which every task's loss reaches).
    for path in paths(params["shared"]):
        assert not any(f"/{t}/" in f"/{path}" for t in NAMES) or path.startswith("columns/"), path
    out, state = apply(model, variables)
    assert {k: v.shape for k, v in out.items()} == {"a": (4, 10), "b": (4, 3)}
    # Gates (MMoE, CGC, PLE, DSelect-k): one distribution over the task's experts per example.
    for k, task in enumerate(["a", "b"]):
        recorded = state.get("intermediates", {}).get("heads", {}).get(task, {})
        if gate_widths:
            assert set(recorded) == set(gate_widths)
        for key, widths in gate_widths.items():
            (weights,) = recorded[key]
            assert weights.shape == (4, widths[k])
            assert jnp.all(weights >= 0) and jnp.allclose(weights.sum(-1), 1.0, atol=1e-5)
        if name == "mtan":  # attention masks in (0, 1), shaped like the stage outputs
            assert {key: v[0].shape for key, v in recorded.items()} == {"mask_0": (4, 8), "mask_1": (4, 8)}
            assert all(jnp.all((v[0] > 0) & (v[0] < 1)) for v in recorded.values())
    # Task parameters affect only their task's prediction.
    bumped = {**params, "heads": {**params["heads"], "a": jax.tree.map(lambda p: p + 0.5, params["heads"]["a"])}}
    out2, _ = apply(model, {**variables, "params": bumped})
    assert not jnp.allclose(out["a"], out2["a"])
    assert jnp.allclose(out["b"], out2["b"])


def test_registry_and_unknown_options():
    assert set(ARCHS) | {"hps"} <= set(MODELS)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['experts'\] for model 'mmoe'; valid options: "
                                         r"\['num_experts'\]"):
        build_model(config("mmoe", experts=3), TASKS)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gamma'\] for model 'dselect_k'.*kgamma"):
        build_model(config("dselect_k", gamma=3.0), TASKS)
    with pytest.raises(ValueError, match=r"unknown staged trunk 'vit'; valid names: \['lenet', 'mlp'\]"):
        build_model(config("mtan", trunk="vit", trunk_kwargs={}), TASKS)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\] for staged trunk 'lenet'"):
        build_model(config("cross_stitch", trunk="lenet", trunk_kwargs={"depth": 2}), TASKS)
    with pytest.raises(ValueError, match="num_specific_experts has 2 entries for 3 tasks"):
        init(build_model(config("cgc", num_specific_experts=[1, 2]), TASKS))


def test_smooth_step_properties():
    gamma = 2.0
    t = np.linspace(-2.0, 2.0, 401)
    s = np.asarray(smooth_step(jnp.asarray(t), gamma))
    assert np.all(s[t <= -gamma / 2] == 0.0) and np.all(s[t >= gamma / 2] == 1.0)
    assert s[200] == pytest.approx(0.5)  # t = 0
    assert np.all(np.diff(s) >= 0)  # monotone
    grad = jax.vmap(jax.grad(lambda u: smooth_step(u, gamma)))
    assert jnp.allclose(grad(jnp.array([-gamma / 2, gamma / 2, -5.0, 5.0])), 0.0, atol=1e-6)  # C^1 at the knots
    assert float(grad(jnp.zeros(1))[0]) == pytest.approx(3 / (2 * gamma))


@pytest.mark.parametrize("num_experts", [8, 5])
def test_dselect_k_selects_k_experts_when_saturated(num_experts):
    """Saturated z-logits (|z| >= gamma/2, where the smooth-step is exactly 0 or 1) make every
    selector one-hot: exactly k experts get non-zero weight, the softmax of the w-logits."""
    k, gamma = 3, 1.0
    codes = binary_codes(num_experts)
    chosen = np.array([0, 2, num_experts - 1])
    z = jnp.where(jnp.asarray(codes[chosen]), gamma, -gamma)[None].repeat(2, 0)  # [B=2, k, m]
    w_logits = jnp.array([[0.3, -1.0, 2.0], [0.0, 0.0, 0.0]])
    gate = jax.jit(dselect_k_weights, static_argnums=(2, 3))  # one compilation, not one per op
    weights = gate(z, w_logits, num_experts, gamma)
    assert weights.shape == (2, num_experts)
    assert jnp.all(jnp.count_nonzero(weights, axis=1) == k)
    assert jnp.allclose(weights[:, chosen], jax.nn.softmax(w_logits, -1), atol=1e-6)
    # Unsaturated logits: a dense distribution over the experts, still summing to 1.
    soft = gate(0.1 * jax.random.normal(jax.random.key(0), z.shape), w_logits, num_experts, gamma)
    assert jnp.all(soft > 0) and jnp.allclose(soft.sum(-1), 1.0, atol=1e-5)


def test_staged_mlp_is_the_mlp_trunk():
    x = jax.random.randint(jax.random.key(4), (4, 6, 6, 1), 0, 256).astype(jnp.uint8)
    staged = StagedMLP((8, 8)).init(jax.random.key(5), x)["params"]
    plain = {"dense_0": staged["stage_0"]["dense"], "dense_1": staged["stage_1"]["dense"]}
    assert jnp.allclose(StagedMLP((8, 8)).apply({"params": staged}, x), MLP((8, 8)).apply({"params": plain}, x))


def test_cross_stitch_identity_init_equals_separate_networks():
    model = build_model(config("cross_stitch", alpha_self=1.0, alpha_other=0.0), TASKS)
    variables = init(model)
    params = variables["params"]
    units = params["shared"]["cross_stitch"]
    assert units.shape == (1, 3, 3) and jnp.array_equal(units[0], jnp.eye(3))
    out, _ = apply(model, variables)
    for task in TASKS:
        rep = StagedMLP((8, 8)).apply({"params": params["shared"]["columns"][task.name]}, X)
        alone = LinearHead(task.num_outputs).apply({"params": params["heads"][task.name]}, rep)
        assert jnp.allclose(out[task.name], alone, atol=1e-6)
    # LibMTL's default (all ones) couples the columns.
    coupled = build_model(config("cross_stitch"), TASKS)
    coupled_params = {**params, "shared": {**params["shared"], "cross_stitch": jnp.ones_like(units)}}
    out2, _ = apply(coupled, {"params": coupled_params})
    assert not jnp.allclose(out["a"], out2["a"])


def test_mtan_on_lenet_masks_every_stage():
    """Shapes only (abstract evaluation); mask values are checked on the MLP above."""
    model = build_model(config("mtan", trunk="lenet", trunk_kwargs={"width": 1}), TASKS[:2])
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.uint8)
    variables = jax.eval_shape(lambda a: init(model, a), x)
    assert set(variables["params"]["shared"]) == {"stage_0", "stage_1", "stage_2", "block_att_0", "block_att_1"}
    assert variables["params"]["heads"]["a"]["attention_1"]["hidden"]["kernel"].shape == (40, 20)  # [h_1; b_0(a_0)]
    out, state = jax.eval_shape(lambda v, a: apply(model, v, a), variables, x)
    for task in ("a", "b"):
        shapes = {key: value[0].shape for key, value in state["intermediates"]["heads"][task].items()}
        assert shapes == {"mask_0": (2, 12, 12, 10), "mask_1": (2, 4, 4, 20), "mask_2": (2, 50)}
    assert out["a"].shape == (2, 10) and out["b"].shape == (2, 3)


def test_ltb_branching_schedule_and_probabilities():
    assert float(ltb_temperature(0, 100)) == pytest.approx(5.0)
    assert float(ltb_temperature(3, 100)) == pytest.approx(2.5)
    model = build_model(config("ltb", epochs=100, steps_per_epoch=1), TASKS)
    variables = init(model)
    logits = variables["params"]["shared"]["branch_logits"]
    assert logits.shape == (1, 3, 3) and int(variables["schedule"]["shared"]["step"]) == 0
    _, state = apply(model, variables, train=True, mutable=("intermediates", "schedule"))
    recorded = state["intermediates"]["shared"]
    assert jnp.allclose(recorded["branch_probs"][0], 1 / 3)  # uniform start
    assert jnp.all(recorded["branching"][0] == 1.0)  # warm-up (epoch 0 < 100/100): every parent summed
    assert int(state["schedule"]["shared"]["step"]) == 1
    # After the warm-up: one hard Gumbel-softmax sample per child column in training, argmax in eval.
    variables = {**variables, "schedule": state["schedule"]}
    _, state = apply(model, variables, train=True, mutable=("intermediates", "schedule"))
    branching = state["intermediates"]["shared"]["branching"][0]
    assert jnp.all((branching == 0) | (branching == 1)) and jnp.all(branching.sum(-1) == 1)
    skewed = {**variables["params"], "shared": {**variables["params"]["shared"],
                                                "branch_logits": logits.at[:, :, 2].add(1.0)}}
    _, state = apply(model, {**variables, "params": skewed})
    assert jnp.all(state["intermediates"]["shared"]["branching"][0][..., 2] == 1)
    # The straight-through estimator passes gradients to the logits.
    grad = jax.grad(lambda z: (ltb_branching(z, 5, 100, jax.random.key(0)) * jnp.arange(3.0)).sum())(logits)
    assert jnp.any(grad != 0)


@pytest.mark.parametrize("num", [1, 3])
def test_stacked_copies_are_independent_modules(num):
    """``blocks.stacked``: leaf shapes get a leading axis of ``num``, copies are initialised
    independently, copy e's output is the module applied with slice e of the parameters, and
    dropout masks differ per copy (the same input to every copy)."""
    import flax.linen as nn

    from mtl_jax.models.blocks import stacked
    from mtl_jax.models.trunks import LeNet

    class Copies(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return stacked(LeNet(dropout=0.5), num, "experts")(x, train)

    x = jnp.asarray(np.random.default_rng(0).random((4, 28, 28, 1)), jnp.float32)
    params = Copies().init(jax.random.key(0), x)["params"]
    single = LeNet(dropout=0.5).init(jax.random.key(1), x)["params"]
    assert jax.tree.map(lambda a: a.shape, params["experts"]) == jax.tree.map(lambda a: (num,) + a.shape, single)
    out = Copies().apply({"params": params}, x)
    assert out.shape == (num, 4, 50)
    for e in range(num):
        copy = jax.tree.map(lambda a: a[e], params["experts"])
        np.testing.assert_allclose(out[e], LeNet(dropout=0.5).apply({"params": copy}, x), rtol=1e-5, atol=1e-6)
    if num > 1:
        kernels = params["experts"]["conv_0"]["kernel"]
        assert not np.allclose(kernels[0], kernels[1])
        same = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], a.shape), params["experts"])
        dropped = Copies().apply({"params": {"experts": same}}, x, True, rngs={"dropout": jax.random.key(2)})
        assert not np.allclose(dropped[0], dropped[1])


def test_image_models_on_vector_inputs_fail_at_init_naming_model_and_input():
    """An image encoder on a tabular dataset fails before any trace, naming the model, trunk and
    input shape; a model that cannot be traced on the data is re-raised naming model, dataset and tasks."""
    from mtl_jax.config import load_config
    from mtl_jax.data import from_arrays
    from mtl_jax.models.moe_vit import M3ViT
    from mtl_jax.train.trainer import build_experiment

    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(8, 16)).astype(np.float32), "a": rng.integers(0, 3, 8), "c": rng.normal(size=(8, 2))}
    tabular = from_arrays("tab", {"train": arrays, "test": arrays}, [T.classification("a", 3), T.regression("c", 2)],
                          input_key="x")
    for file, what in (("multimnist.py", "model 'hps' with trunk 'lenet'"), ("multimnist_m3vit.py", "model 'm3vit'"),
                       ("multimnist_mtan.py", "model 'mtan' with trunk 'lenet'")):
        with pytest.raises(ValueError, match=rf"{what} needs images \[H, W, C\] per example; input 'x' has shape "
                                             r"\(16,\) per example"):
            build_experiment(load_config(f"configs/{file}:smoke"), tabular)
    bad = load_config("configs/digits_mlp.py:smoke", ["model.name='cgc'", "model.arch_kwargs={'num_specific_experts': (1, 2, 3)}"])
    with pytest.raises(ValueError, match=r"model 'cgc' cannot be initialised on dataset 'tab' \(input 'x' \(16,\) float32 "
                                         r"per example; tasks \['a \(classification, 3 outputs\)'.*num_specific_experts"):
        build_experiment(bad, tabular)
    with pytest.raises(ValueError, match="moe_every must be >= 1; got 0"):
        M3ViT(heads={}, moe_every=0)
