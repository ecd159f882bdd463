"""The Method contract: ``Needs`` as an enum, typed NamedTuple states, per-parameter state declared
by the method (no factory signatures read by the trainer), and ``chain(weighting, aggregator)``
(IMTL = chain(imtl_l, imtl_g) against the paper's hybrid, UW + PCGrad, MoCo on scaled rows, the
train step's shared / head updates, and ``train_and_evaluate`` end to end)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data.pipeline import to_global
from mtl_jax.train.forward import make_forward
from mtl_jax.train.gradients import keeps_parameter_state
from mtl_jax.train.methods import (METHODS, ChainState, EmptyState, Method, MethodInputs, Needs, chain, get_method,
                                   head_scales, returns_direction, with_num_params)
from mtl_jax.train.methods.jacobian import MoCoState
from mtl_jax.train.methods.weighting import IMTLLState, UWState
from mtl_jax.train.trainer import train_and_evaluate

from test_step_feeds import DATASET, LR, experiment

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PER_PARAMETER = {"moco", "excess_mtl"}


def _inputs(jac, losses, step=0):
    jac = jnp.asarray(jac, jnp.float32)
    return MethodInputs(losses=jnp.asarray(losses, jnp.float32), step=jnp.int32(step), gramian=jac @ jac.T,
                        jacobian=jac)


# ------------------------------------------------------------------------------ needs, states


def test_needs_is_a_str_enum_and_is_validated():
    assert Needs.GRAMIAN == "gramian" and f"{Needs.JACOBIAN}" == "jacobian" and Needs("losses") is Needs.LOSSES
    method = Method("m", lambda k: EmptyState(), None, "gramian", False)
    assert method.needs is Needs.GRAMIAN
    with pytest.raises(ValueError, match="needs must be one of"):
        Method("m", None, None, "gramain", False)
    with pytest.raises(ValueError, match="wants unknown input"):
        Method("m", None, None, "losses", True, wants=("gramian",))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_states_are_typed_namedtuples_that_keep_their_structure(name):
    """Every state is a NamedTuple (``EmptyState`` when stateless), ``update`` returns the same
    pytree structure (jit), and ``per_parameter_state`` is declared by exactly MoCo / ExcessMTL."""
    method = get_method(name)
    assert method.per_parameter_state == (name in PER_PARAMETER), name
    assert keeps_parameter_state(method) == (name in PER_PARAMETER)
    method = with_num_params(method, 5)
    state = method.init(3)
    assert isinstance(state, tuple) and hasattr(state, "_fields"), (name, type(state))
    rng = np.random.default_rng(0)
    jac = rng.normal(size=(3, 5))
    out, new_state = jax.jit(method.update)(_inputs(jac, [1.0, 2.0, 0.5]), state, jax.random.key(0))
    assert jax.tree.structure(new_state) == jax.tree.structure(state), name
    assert out.shape == ((5,) if returns_direction(method) else (3,))


def test_per_parameter_state_size_is_an_init_argument():
    moco = get_method("moco")
    assert moco.init(2, num_params=7).tracked.shape == (2, 7)
    assert with_num_params(moco, 4).init(3).tracked.shape == (3, 4)
    assert get_method("moco", num_params=6).init(2).tracked.shape == (2, 6)  # the factory's default
    uw = get_method("uw")
    assert with_num_params(uw, 4) is uw  # nothing to bind without per-parameter state


def test_trainer_binds_the_shared_parameter_count_without_reading_signatures():
    exp = experiment("method.name='chain'", "method.weighting='uw'", "method.aggregator='moco'")
    shared = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params["shared"]))
    assert exp.method.per_parameter_state
    assert exp.abstract_state.method_state.aggregator.tracked.shape == (3, shared)
    with pytest.raises(ValueError, match=r"method 'chain\(uw,moco\)' keeps per-parameter state"):
        experiment("method.name='chain'", "method.weighting='uw'", "method.aggregator='moco'",
                    "jacobian.level='representation'")


# ------------------------------------------------------------------------------------- chain


def _imtl_g_paper(grads):
    """IMTL-G's closed form (Liu et al. 2021, Eq. 9): ``alpha_{2:K} = g_1 U^T (D U^T)^-1`` with rows
    ``D_k = g_1 - g_k``, ``U_k = u_1 - u_k`` (``u`` the unit gradients), ``alpha_1 = 1 - sum``."""
    units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    d, u = grads[0] - grads[1:], units[0] - units[1:]
    rest = grads[0] @ u.T @ np.linalg.inv(d @ u.T)
    return np.concatenate([[1.0 - rest.sum()], rest])


def test_imtl_is_the_papers_hybrid_of_imtl_l_and_imtl_g():
    """IMTL (Sec. 3.3 / Alg. 1): loss scales ``e^s`` from IMTL-L, IMTL-G's weights from the gradients
    of the scaled losses ``e^{s_k} g_k`` (Gramian ``diag(e^s) G diag(e^s)``), the shared update
    ``sum_k alpha_k e^{s_k} g_k``, heads trained on the scaled losses."""
    rng = np.random.default_rng(3)
    jac, s = rng.normal(size=(4, 9)), rng.normal(size=4) * 0.7
    losses = rng.uniform(0.5, 2.0, size=4)
    method = get_method("imtl", lr=0.1)
    assert method.needs == "gramian" and not method.weights_heads and not returns_direction(method)
    opt = optax.adam(0.1)
    state = method.init(4)._replace(weighting=IMTLLState(jnp.asarray(s, jnp.float32), opt.init(jnp.zeros(4))))
    out, new_state = jax.jit(method.update)(_inputs(jac, losses), state, jax.random.key(0))

    scales = np.exp(s)
    alpha = _imtl_g_paper(scales[:, None] * jac)
    np.testing.assert_allclose(np.asarray(out), scales * alpha, rtol=2e-4, atol=1e-6)
    shared = (scales[:, None] * jac).T @ alpha  # sum_k alpha_k e^{s_k} g_k
    np.testing.assert_allclose(np.asarray(out) @ jac, shared, rtol=2e-4, atol=1e-5)
    unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)  # impartial: equal projections on every task
    np.testing.assert_allclose(unit @ shared, np.full(4, (unit @ shared)[0]), rtol=1e-3)
    # heads: the gradient of e^{s_k} L_k; IMTL-L's s took its Adam step on e^{s} L - 1
    np.testing.assert_allclose(np.asarray(head_scales(method, out, new_state)), scales, rtol=1e-6)
    grad_s = scales * losses - 1.0
    np.testing.assert_allclose(np.asarray(new_state.weighting.log_scale), s - 0.1 * np.sign(grad_s), rtol=1e-5,
                               atol=1e-5)


def test_uw_then_pcgrad_is_pcgrad_on_the_uw_weighted_gradients():
    rng = np.random.default_rng(4)
    g1 = rng.normal(size=6)
    jac = np.stack([g1, -0.7 * g1 + 0.4 * rng.normal(size=6)])  # conflicting
    log_var = np.array([0.8, -0.5])
    method = chain(get_method("uw"), get_method("pcgrad"))
    assert method.name == "chain(uw,pcgrad)" and method.needs == Needs.GRAMIAN
    uw_opt = optax.adam(0.025)
    state = method.init(2)._replace(weighting=UWState(jnp.asarray(log_var, jnp.float32), uw_opt.init(jnp.zeros(2))))
    out, new_state = jax.jit(method.update)(_inputs(jac, [1.3, 0.4]), state, jax.random.key(1))

    h = (0.5 * np.exp(-log_var))[:, None] * jac  # the UW-weighted gradients w1_k g_k
    assert h[0] @ h[1] < 0
    projected = [h[i] - (h[i] @ h[j]) / (h[j] @ h[j]) * h[j] for i, j in ((0, 1), (1, 0))]  # Yu et al. 2020
    np.testing.assert_allclose(np.asarray(out) @ jac, projected[0] + projected[1], rtol=1e-4, atol=1e-6)
    uw_w, uw_state = get_method("uw").update(MethodInputs(losses=jnp.asarray([1.3, 0.4]), step=jnp.int32(0)),
                                             state.weighting, None)
    np.testing.assert_allclose(np.asarray(new_state.scales), np.asarray(uw_w), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state.weighting), jax.tree.leaves(uw_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)

    # K = 3, random visiting order: the aggregator gets the step's key and the scaled inputs
    jac3 = rng.normal(size=(3, 6))
    state3 = method.init(3)._replace(weighting=UWState(jnp.asarray([0.3, -0.2, 0.9]), uw_opt.init(jnp.zeros(3))))
    out3, _ = method.update(_inputs(jac3, [1.0, 2.0, 0.5]), state3, jax.random.key(7))
    w1 = 0.5 * np.exp(-np.array([0.3, -0.2, 0.9]))
    pc, _ = get_method("pcgrad").update(_inputs(w1[:, None] * jac3, w1 * np.array([1.0, 2.0, 0.5])), EmptyState(),
                                        jax.random.key(7))
    np.testing.assert_allclose(np.asarray(out3), w1 * np.asarray(pc), rtol=1e-4)


def test_chain_with_a_direction_method_scales_the_jacobian_rows():
    rng = np.random.default_rng(5)
    jac, losses = rng.normal(size=(2, 5)), np.array([1.5, 0.5])
    method = with_num_params(chain(get_method("gls"), get_method("moco")), 5)
    assert returns_direction(method) and method.per_parameter_state
    state = method.init(2)
    assert isinstance(state, ChainState) and isinstance(state.aggregator, MoCoState)
    d, new_state = method.update(_inputs(jac, losses), state, None)
    w1 = np.sqrt(np.prod(losses)) / (2 * losses)  # GLS: GM / (K L_k)
    want, _ = get_method("moco", num_params=5).update(_inputs(w1[:, None] * jac, w1 * losses),
                                                     get_method("moco", num_params=5).init(2), None)
    np.testing.assert_allclose(np.asarray(d), np.asarray(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(head_scales(method, jnp.full(2, jnp.nan), new_state)), w1, rtol=1e-5)


def test_chain_delegates_after_update_and_merges_wants():
    famo = get_method("famo")
    method = chain(famo, get_method("sdmgrad"))
    assert method.wants == ("cross_gramian",) and method.after_update is not None
    assert chain(get_method("gradnorm"), get_method("modo")).wants == ("last_shared_gramian", "cross_gramian")
    assert chain(get_method("uw"), get_method("mgda")).after_update is None
    state = method.init(2)
    inputs = MethodInputs(losses=jnp.asarray([1.0, 2.0]), step=jnp.int32(0), updated_losses=jnp.asarray([2.0, 1.0]))
    after = method.after_update(inputs, state)
    np.testing.assert_allclose(np.asarray(after.weighting.logits),
                               np.asarray(famo.after_update(inputs, famo.init(2)).logits))
    # a loss weighting as the aggregator: weights w1 * w2 on the shared part and on the heads
    both = chain(get_method("gls"), get_method("uw"))
    assert both.weights_heads and both.head_weights is None


def test_chain_config_forms_and_errors():
    cfg = ConfigDict({"name": "chain", "weighting": {"name": "uw", "lr": 0.05}, "aggregator": "pcgrad"})
    hparams = dict(cfg)
    method = get_method(hparams.pop("name"), **hparams)
    assert method.name == "chain(uw,pcgrad)"
    with pytest.raises(ValueError, match="weighting must be a loss-weighting method"):
        get_method("chain", weighting="pcgrad", aggregator="uw")
    with pytest.raises(ValueError, match=r"unknown hyperparameter.*'lrr'.*'uw'"):
        get_method("chain", weighting={"name": "uw", "lrr": 1.0}, aggregator="pcgrad")
    with pytest.raises(ValueError, match="mapping with 'name'"):
        get_method("chain", weighting={"lr": 1.0}, aggregator="pcgrad")
    with pytest.raises(ValueError, match="at least 2 tasks"):
        get_method("chain", weighting="uw", aggregator="pcgrad", num_tasks=1)


# ------------------------------------------------------------------------------ in the step




def _two_steps_of_uw_then_imtl_g():
    """Two SGD steps of chain(uw, imtl_g) (the second with unequal UW scales): per step the
    parameters before it, its batch, its reported weights and the scales w1 it used."""
    exp = experiment("method.name='chain'", "method.weighting={'name': 'uw', 'lr': 0.3}", "method.aggregator='imtl_g'")
    forward = make_forward(exp.model, DATASET.tasks, "x")
    loss = jax.jit(lambda params, batch: forward(params, {}, batch, jax.random.key(0), True)[0])
    state, records = exp.init(), []
    src = DATASET.splits["train"]
    for start in (0, 16):
        batch = {k: np.stack([src[i][k] for i in range(start, start + 16)]) for k in ("x", "a", "b", "c")}
        params = jax.device_get(state.params)
        state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
        records.append((params, batch, np.asarray(out["weights"]), np.asarray(state.method_state.scales),
                        jax.device_get(state.params)))
    return loss, records


def test_chain_in_the_step_updates_the_shared_parameters_by_the_product_weights():
    loss, records = _two_steps_of_uw_then_imtl_g()
    assert np.ptp(records[1][3]) > 1e-3  # the second step's UW scales differ across tasks
    for params, batch, weights, scales, after in records:
        grad_shared = jax.grad(lambda p: jnp.dot(jnp.asarray(weights), loss(p, batch)))(params)["shared"]
        for a, p, g in zip(jax.tree.leaves(after["shared"]), jax.tree.leaves(params["shared"]),
                           jax.tree.leaves(grad_shared)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(p) - LR * np.asarray(g), rtol=1e-4, atol=1e-6)


def test_chain_in_the_step_trains_head_k_on_the_scaled_loss():
    loss, records = _two_steps_of_uw_then_imtl_g()
    for params, batch, weights, scales, after in records:
        grad_heads = jax.grad(lambda p: jnp.dot(jnp.asarray(scales), loss(p, batch)))(params)["heads"]
        for a, p, g in zip(jax.tree.leaves(after["heads"]), jax.tree.leaves(params["heads"]),
                           jax.tree.leaves(grad_heads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(p) - LR * np.asarray(g), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides", [
    ("method.name='imtl'",),
    ("method.name='chain'", "method.weighting.name='uw'", "method.aggregator.name='pcgrad'"),
])
def test_chained_methods_train_end_to_end_and_resume(tmp_path, overrides):
    config = apply_overrides(load_config(os.path.join(ROOT, "configs", "digits_mlp.py")),
                             ["num_steps=5", "progress_bar=False", "model.trunk_kwargs.features=(32,)"]
                             + list(overrides))
    first = train_and_evaluate(config, str(tmp_path))
    assert first["nonfinite_total"] == 0 and not first["warnings"], first["warnings"]
    method_state = first["state"].method_state
    assert isinstance(method_state, ChainState)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(method_state))
    assert np.ptp(np.asarray(method_state.scales)) > 0  # IMTL-L / UW moved the loss scales apart
    resumed = train_and_evaluate(config, str(tmp_path))  # restores the step-5 checkpoint (typed states)
    assert isinstance(resumed["state"].method_state, ChainState)
    for a, b in zip(jax.tree.leaves(resumed["state"].method_state), jax.tree.leaves(method_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
