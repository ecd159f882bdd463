"""Every MTL method inside the real train step: MultiMNIST smoke training, representation-level
gradients (MGDA-UB) and chunked Jacobians against references."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data import get_dataset
from mtl_jax.data.pipeline import to_global, train_dataset
from mtl_jax.errors import UsageError
from mtl_jax.train.methods import METHODS, MethodInputs, get_method
from mtl_jax.train.forward import make_representation_forward
from mtl_jax.train.trainer import build_experiment, evaluate

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def multimnist(data_dir):
    config = load_config(os.path.join(ROOT, "configs", "multimnist.py:smoke"))
    return get_dataset(config.data)


def small_config(*overrides):
    config = load_config(os.path.join(ROOT, "configs", "multimnist.py:smoke"))
    return apply_overrides(config, ["model.trunk='mlp'", "model.trunk_kwargs={'features': (64,)}",
                                    "model.head='linear'", "model.head_kwargs={}", "optim.lr=3e-3",
                                    "optim.schedule='constant'", "mesh.data=2", "mesh.model=1"] + list(overrides))


def train_steps(exp, num_steps, batch_size=64):
    keys = [exp.dataset.input_key] + [t.label_key for t in exp.dataset.tasks]
    stream = train_dataset(exp.dataset.splits["train"], keys=keys, global_batch_size=batch_size, seed=0)
    state = exp.init()
    for i in range(num_steps):
        state, out = exp.train_step(state, to_global(stream[i], exp.data_sharding))
    return state


# One method per code path of the train step: loss weights (one VJP), Gramian weights, Jacobian
# weights, Jacobian direction. The slow test runs all of METHODS the same way.
FAST_SUBSET = ("famo", "mgda", "excess_mtl", "graddrop")


def check_methods_train(multimnist, names):
    failures = {}
    for name in names:
        exp = build_experiment(small_config(f"method.name='{name}'"), multimnist)
        state = train_steps(exp, 60)
        res = evaluate(exp.eval_step, state, multimnist, "test", 256, exp.data_sharding)
        finite = all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
        if not finite or int(state.nonfinite_total) or min(r["accuracy"] for r in res.values()) < 0.3:
            failures[name] = (finite, int(state.nonfinite_total), res)  # chance is 0.1
    assert not failures, failures


def test_one_method_per_step_path_trains_multimnist_without_nan_and_beats_chance(multimnist):
    check_methods_train(multimnist, FAST_SUBSET)


@pytest.mark.slow
def test_every_method_trains_multimnist_without_nan_and_beats_chance(multimnist):
    check_methods_train(multimnist, sorted(METHODS))


@pytest.mark.parametrize("kind,method", [("sam", "ew"), ("fmtl", "mgda"), ("fmtl_a", "upgrad")])
def test_sharpness_steps_train_multimnist(multimnist, kind, method):
    exp = build_experiment(small_config(f"method.name='{method}'", f"sharpness.kind='{kind}'",
                                        "sharpness.rho=0.02"), multimnist)
    state = train_steps(exp, 60)
    res = evaluate(exp.eval_step, state, multimnist, "test", 256, exp.data_sharding)
    assert int(state.nonfinite_total) == 0 and min(r["accuracy"] for r in res.values()) > 0.3, res


def sgd_step_setup(multimnist, *overrides):
    """One-device SGD(0.1) experiment, a 32-example batch, its fresh state and params, and the
    model's (encode, decode) split for reference gradients."""
    exp = build_experiment(small_config(*overrides, "optim.name='sgd'", "optim.lr=0.1", "mesh.data=1"), multimnist)
    keys = [multimnist.input_key] + [t.label_key for t in multimnist.tasks]
    batch = train_dataset(multimnist.splits["train"], keys=keys, global_batch_size=32, seed=0)[0]
    state = exp.init()
    encode, decode = make_representation_forward(exp.model, multimnist.tasks, multimnist.input_key)
    return exp, batch, state, jax.device_get(state.params), encode, decode


def test_representation_level_mgda_matches_a_reference(multimnist):
    exp, batch, state, params, encode, decode = sgd_step_setup(multimnist, "method.name='mgda'",
                                                               "jacobian.level='representation'")
    jbatch = jax.tree.map(jnp.asarray, batch)
    key = jax.random.key(0)  # the MLP has no dropout: keys do not matter

    @jax.jit  # the reference, jitted: eager autodiff dispatches op by op
    def reference_step(params):
        z = encode(params["shared"], jbatch, key, True)
        losses = decode(params["heads"], z, jbatch, key, True)[0]
        rows = [jax.grad(lambda zz, k=k: decode(params["heads"], zz, jbatch, key, True)[0][k])(z) for k in range(2)]
        flat = jnp.stack([r.ravel() for r in rows])
        w, _ = get_method("mgda", num_tasks=2).update(
            MethodInputs(losses=losses, step=jnp.int32(0), gramian=flat @ flat.T), {}, None)
        cotangent = w[0] * rows[0] + w[1] * rows[1]
        _, enc_vjp = jax.vjp(lambda p: encode(p, jbatch, key, True), params["shared"])
        shared = enc_vjp(cotangent)[0]
        heads = jax.grad(lambda hp: decode(hp, z, jbatch, key, True)[0].sum())(params["heads"])
        return w, jax.tree.map(lambda p, g: p - 0.1 * g, params, {"shared": shared, "heads": heads})

    w, want = reference_step(params)
    state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
    np.testing.assert_allclose(np.asarray(out["weights"]), np.asarray(w), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_representation_level_refuses_a_model_with_batch_statistics_in_one_line(multimnist):
    exp, batch, state, *_ = sgd_step_setup(multimnist, "method.name='mgda'", "jacobian.level='representation'",
                                           "model.trunk_kwargs={'features': (64,), 'batch_norm': True}")
    with pytest.raises(UsageError, match=r"jacobian.level='representation' needs a model without mutable state.*"
                                         r"batch_stats.*jacobian.level='params'"):
        exp.train_step(state, to_global(batch, exp.data_sharding))


def test_representation_level_refuses_a_model_that_sows_auxiliary_losses_in_one_line():
    """The heads' decode drops sown losses (MoE balancing, AiT's token loss): refused, not ignored."""
    import flax.linen as nn
    from ml_collections import ConfigDict

    from mtl_jax import tasks as T
    from mtl_jax.models.heads import LinearHead
    from mtl_jax.models.moe_layers import AUX_LOSS
    from mtl_jax.models.multitask import HardParameterSharing
    from mtl_jax.train.gradients import StepContext, make_gradients

    class SowingTrunk(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Dense(4)(x)
            if train:
                self.sow(AUX_LOSS, "balance", jnp.mean(h ** 2))
            return h

    tasks = [T.classification("a", 2), T.classification("b", 2)]
    model = HardParameterSharing(trunk=SowingTrunk(), heads={t.name: LinearHead(num_outputs=2) for t in tasks})
    batch = {"x": jnp.ones((4, 3)), "a": jnp.zeros((4,), jnp.int32), "b": jnp.ones((4,), jnp.int32)}
    params = model.init(jax.random.key(0), batch["x"])["params"]
    gradients = make_gradients(model, tasks, get_method("mgda", num_tasks=2), "x",
                               jacobian=ConfigDict({"level": "representation", "chunk": 0, "gramian_mode": "layerwise",
                                                    "last_shared": ""}), sample_input=batch["x"])
    ctx = StepContext(params, {}, batch, jax.random.key(1), get_method("mgda", num_tasks=2).init(2), jnp.int32(0),
                      jax.random.key(2))
    with pytest.raises(UsageError, match=r"jacobian.level='representation' would drop the auxiliary losses.*"
                                         r"jacobian.level='params'"):
        gradients(ctx)


def test_representation_level_gradnorm_reads_the_norms_of_the_representation_gradients(multimnist):
    """LibMTL's GradNorm with ``rep_grad=True``: ``G_k = w_k ||dL_k/dz||``. Three SGD steps against a
    loop that feeds GradNorm the Gramian of hand-computed ``dL_k/dz`` (its third weights depend on
    the norms' magnitudes through Adam's second step, not only on their order)."""
    exp, batch, state, params, encode, decode = sgd_step_setup(multimnist, "method.name='gradnorm'",
                                                               "jacobian.level='representation'")
    jbatch, global_batch = jax.tree.map(jnp.asarray, batch), to_global(batch, exp.data_sharding)
    key = jax.random.key(0)  # the MLP has no dropout: keys do not matter
    gradnorm = get_method("gradnorm", num_tasks=2)
    ref_state = gradnorm.init(2)
    losses_at = jax.jit(lambda p: decode(p["heads"], encode(p["shared"], jbatch, key, True), jbatch, key, True)[0])

    @jax.jit
    def representation_gramian(p):
        z = encode(p["shared"], jbatch, key, True)
        rows = jnp.stack([jax.grad(lambda zz, k=k: decode(p["heads"], zz, jbatch, key, True)[0][k])(z).ravel()
                          for k in range(2)])
        return rows @ rows.T

    sgd = jax.jit(lambda p, w: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(lambda q: w @ losses_at(q))(p)))
    for step in range(3):
        w, ref_state = gradnorm.update(MethodInputs(losses=losses_at(params), step=jnp.int32(step),
                                                    last_shared_gramian=representation_gramian(params)),
                                       ref_state, None)
        params = sgd(params, w)
        state, out = exp.train_step(state, global_batch)
        np.testing.assert_allclose(np.asarray(out["weights"]), np.asarray(w), rtol=1e-5)
    assert float(jnp.abs(w[0] - w[1])) > 1e-3  # the weights have moved
    np.testing.assert_allclose(np.asarray(state.method_state.logits), np.asarray(ref_state.logits), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_chunked_jacobian_equals_one_vmap():
    config = load_config(os.path.join(ROOT, "configs", "digits_mlp.py"))
    dataset = get_dataset(config.data)
    keys = [dataset.input_key] + [t.label_key for t in dataset.tasks]
    batch = train_dataset(dataset.splits["train"], keys=keys, global_batch_size=64, seed=0)[0]
    params = []
    for chunk in (0, 2):
        exp = build_experiment(apply_overrides(load_config(os.path.join(ROOT, "configs", "digits_mlp.py")),
                                               ["method.name='upgrad'", f"jacobian.chunk={chunk}",
                                                "model.trunk_kwargs={'features': (16,)}"]), dataset)
        state, _ = exp.train_step(exp.init(), to_global(batch, exp.data_sharding))
        params.append(jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_representation_level_needs_a_single_representation():
    from mtl_jax.train.forward import make_representation_forward as rep

    with pytest.raises(ValueError, match="one shared representation"):
        rep(object(), (), "image")


def test_rep_mtl_step_matches_the_gradient_of_the_regularised_objective(multimnist):
    from mtl_jax.train import rep_mtl

    exp, batch, state, params, encode, decode = sgd_step_setup(multimnist, "rep_mtl.tsr_weight=0.5",
                                                               "rep_mtl.csa_weight=0.5")
    jbatch, key = jax.tree.map(jnp.asarray, batch), jax.random.key(0)

    def total(p):
        z = encode(p["shared"], jbatch, key, True)
        reg, aux = rep_mtl.rep_mtl_loss(lambda zz: decode(p["heads"], zz, jbatch, key, True)[0], z,
                                        tsr_weight=0.5, csa_weight=0.5, temperature=0.5)
        return aux["losses"].sum() + reg

    grads = jax.jit(jax.grad(total))(params)  # jitted: eager double backprop dispatches op by op
    want = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
    assert bool(out["applied"])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="Rep-MTL regularisers combine with loss-weighting methods"):
        build_experiment(small_config("rep_mtl.tsr_weight=0.5", "method.name='mgda'"), multimnist)
