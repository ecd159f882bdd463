"""SAM / ASAM and task-based flat minima (F-MTL) in the train step, against loop references."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data import get_dataset
from mtl_jax.data.pipeline import to_global
from mtl_jax.train import flat_minima
from mtl_jax.train.methods import MethodInputs, get_method
from mtl_jax.train.forward import make_forward
from mtl_jax.train.trainer import build_experiment

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "digits_mlp.py")


def setup(*overrides):
    config = load_config(CONFIG)
    apply_overrides(config, ["mesh.data=1", "mesh.model=1", "optim.name='sgd'", "optim.lr=0.1",
                             "model.trunk_kwargs.features=(16,)"] + list(overrides))
    exp = build_experiment(config, DATASET)
    keys = [DATASET.input_key] + [t.label_key for t in DATASET.tasks]
    batch = {k: np.stack([DATASET.splits["train"][i][k] for i in range(32)]) for k in keys}
    return config, exp, batch


DATASET = get_dataset(load_config(CONFIG).data)


def losses_fn_of(exp, state, batch):
    forward = make_forward(exp.model, exp.dataset.tasks, exp.dataset.input_key)
    key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))[0]
    return lambda p: forward(p, state.model_state, batch, key, True)[0]


def tree_allclose(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def sgd_step(params, grads, lr=0.1):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def test_perturbation_closed_forms():
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
    eps = flat_minima.perturbation(grads, params, rho=0.5, adaptive=False, eta=0.0)
    tree_allclose(eps, {"a": np.array([0.3, 0.0]), "b": np.array([[0.4]])}, rtol=1e-6)  # rho * g / 5
    eps = flat_minima.perturbation(grads, params, rho=1.0, adaptive=True, eta=0.0)
    # T = |w|: T g = (3, 0, 2), ||T g|| = sqrt(13); eps = T^2 g / sqrt(13)
    tree_allclose(eps, {"a": np.array([3.0, 0.0]) / np.sqrt(13), "b": np.array([[1.0]]) / np.sqrt(13)}, rtol=1e-6)


def test_vmapped_perturbed_gradients_match_a_loop_and_move_only_own_head():
    _, exp, batch = setup()
    state = exp.init()
    batch = jax.tree.map(jnp.asarray, batch)
    losses_fn = losses_fn_of(exp, state, batch)
    names = exp.dataset.task_names

    @jax.jit
    def vmapped(params):
        jac = jax.jacrev(losses_fn)(params)  # leaves [K, ...]
        eps = flat_minima.task_perturbations(jac, params, 0.05, False, 0.0)
        return eps, flat_minima.perturbed_task_gradients(losses_fn, params, eps)

    eps, got = jax.device_get(vmapped(state.params))
    grad_at = jax.jit(lambda p, e, k: jax.grad(lambda q: losses_fn(q)[k])(flat_minima.add(p, e)), static_argnums=2)
    for k, name in enumerate(names):
        eps_k = jax.tree.map(lambda e: e[k], eps)
        norm = np.sqrt(sum(float(np.vdot(e, e)) for e in jax.tree.leaves(eps_k)))
        assert norm == pytest.approx(0.05, rel=1e-4)
        for other in names:
            if other != name:
                assert all(float(np.abs(e).max()) == 0.0 for e in jax.tree.leaves(eps_k["heads"][other]))
        want = grad_at(state.params, eps_k, k)
        tree_allclose(jax.tree.map(lambda g: g[k], got), want, rtol=2e-4, atol=1e-6)


def test_sam_step_matches_hand_computed_sam():
    _, exp, batch = setup("sharpness.kind='sam'", "sharpness.rho=0.1")
    state = exp.init()
    params = jax.device_get(state.params)
    losses_fn = losses_fn_of(exp, state, jax.tree.map(jnp.asarray, batch))
    grad_total = jax.jit(jax.grad(lambda p: losses_fn(p).sum()))
    g = grad_total(params)
    eps = jax.tree.map(lambda x: 0.1 * x / np.sqrt(sum(float(jnp.vdot(y, y)) for y in jax.tree.leaves(g))), g)
    want = sgd_step(params, grad_total(flat_minima.add(params, eps)))
    state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
    assert bool(out["applied"])
    tree_allclose(state.params, want, rtol=1e-4, atol=1e-6)


def test_fmtl_with_equal_weighting_is_the_sum_of_perturbed_gradients_and_rho0_is_plain():
    results = {}
    for kind, rho in [("", 0.05), ("fmtl", 0.0), ("fmtl", 0.05), ("fmtl_a", 0.05)]:
        _, exp, batch = setup(f"sharpness.kind='{kind}'", f"sharpness.rho={rho}")
        state, _ = exp.train_step(exp.init(), to_global(batch, exp.data_sharding))
        results[(kind, rho)] = jax.device_get(state.params)
    tree_allclose(results[("fmtl", 0.0)], results[("", 0.05)], rtol=1e-5, atol=1e-7)
    tree_allclose(results[("fmtl", 0.05)], results[("fmtl_a", 0.05)], rtol=1e-4, atol=1e-6)  # A linear: A(g)+A(h)=A(g~)
    assert not np.allclose(results[("fmtl", 0.05)]["shared"]["dense_0"]["kernel"],
                           results[("", 0.05)]["shared"]["dense_0"]["kernel"])


def test_fmtl_with_mgda_matches_a_loop_reference():
    _, exp, batch = setup("method.name='mgda'", "sharpness.kind='fmtl'", "sharpness.rho=0.05")
    state = exp.init()
    params = jax.device_get(state.params)
    losses_fn = losses_fn_of(exp, state, jax.tree.map(jnp.asarray, batch))
    names = exp.dataset.task_names
    mgda = get_method("mgda", num_tasks=len(names))
    losses = losses_fn(params)
    # jitted once, called per task (eager autodiff would dispatch op by op)
    task_grad = jax.jit(lambda p, onehot: jax.grad(lambda q: onehot @ losses_fn(q))(p))
    onehots = list(jnp.eye(len(names)))
    grads = [task_grad(params, e) for e in onehots]
    perturbed = []
    for e, g in zip(onehots, grads):
        norm = np.sqrt(sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(g)))
        eps = jax.tree.map(lambda x: 0.05 * x / norm, g)
        perturbed.append(task_grad(flat_minima.add(params, eps), e))

    @jax.jit
    def mgda_combine(rows):
        flat = jnp.stack([jnp.concatenate([x.ravel() for x in jax.tree.leaves(r["shared"])]) for r in rows])
        w, _ = mgda.update(MethodInputs(losses=losses, step=jnp.int32(0), gramian=flat @ flat.T), {}, None)
        return jax.tree.map(lambda *xs: sum(wk * x for wk, x in zip(w, xs)), *[r["shared"] for r in rows])

    flat_dirs = [jax.tree.map(jnp.subtract, gt, g) for gt, g in zip(perturbed, grads)]
    shared = jax.tree.map(jnp.add, mgda_combine(grads), mgda_combine(flat_dirs))
    heads = {n: perturbed[k]["heads"][n] for k, n in enumerate(names)}
    want = sgd_step(params, {"shared": shared, "heads": heads})
    state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
    tree_allclose(state.params, want, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["fmtl", "sam"])
def test_perturbed_passes_leave_batch_norm_statistics_to_the_plain_forward(kind):
    """With a BatchNorm trunk, the step's new running statistics are the plain forward's at theta_t
    (F-MTL / SAM's perturbed forwards update none), and differ from a perturbed forward's."""
    _, exp, batch = setup(f"sharpness.kind='{kind}'", "sharpness.rho=0.5", "model.trunk_kwargs.batch_norm=True")
    state = exp.init()
    assert "batch_stats" in state.model_state
    forward = make_forward(exp.model, exp.dataset.tasks, exp.dataset.input_key)
    key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))[0]
    stats_at = jax.jit(lambda p: forward(p, state.model_state, jax.tree.map(jnp.asarray, batch), key, True)[1][1])
    params = jax.device_get(state.params)
    plain = stats_at(params)
    shifted = stats_at(jax.tree.map(lambda x: x + 0.05 * jnp.sign(x), params))  # a perturbed point
    before = jax.device_get(state.model_state)  # the step donates the state
    new_state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
    assert bool(out["applied"])
    tree_allclose(new_state.model_state, plain, rtol=1e-5, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(shifted)[0], jax.tree.leaves(plain)[0])
    assert not np.allclose(jax.tree.leaves(plain)[0], jax.tree.leaves(before)[0])  # the stats moved


def test_unknown_sharpness_kind_is_rejected():
    with pytest.raises(ValueError, match=r"unknown sharpness kind 'asam'; valid"):
        setup("sharpness.kind='asam'")
