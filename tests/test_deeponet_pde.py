"""Finite-difference PDE solvers (convergence against manufactured solutions), the masked loss,
MT-DeepONet's input checks and a smoke training run."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtl_jax import tasks as T
from mtl_jax.config import load_config
from mtl_jax.data import get_dataset
from mtl_jax.data import pde
from mtl_jax.models import build_model
from mtl_jax.train.losses import masked_mse, relative_l2
from mtl_jax.train.trainer import build_experiment

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pde_fisher.py")


def observed_orders(errors):
    errors = np.asarray(errors)
    return np.log2(errors[:-1] / errors[1:])


def fisher_error(nx, diffusion=0.1, reaction=1.0, t_final=0.5):
    """Max error at t_final against the manufactured solution u = exp(-t) sin(pi x)."""
    x = jnp.linspace(0.0, 1.0, nx)
    exact = lambda t: jnp.exp(-t) * jnp.sin(jnp.pi * x)
    # u_t - D u_xx - r u (1 - u) for the exact u:
    source = lambda t: -exact(t) + diffusion * jnp.pi**2 * exact(t) - reaction * exact(t) * (1 - exact(t))
    u = pde.solve_fisher(exact(0.0), source, diffusion, reaction, t_final, 3, 1.0 / (nx - 1))
    return float(jnp.abs(u[-1] - exact(t_final)).max())


def test_fisher_solver_is_second_order():
    errors = [fisher_error(n) for n in (9, 17, 33)]
    assert errors[-1] < 1e-3, errors
    assert np.all(observed_orders(errors) > 1.8), errors


def darcy_error(n, half_domain: bool):
    """Max nodal error against a manufactured solution with k = 1 + sin(pi x) cos(pi y) / 2:
    u = sin(pi x) sin(pi y) on the square, or u = sin(2 pi x) sin(pi y) on the masked half x < 1/2."""
    error, leak = _darcy_error_and_leak(n, half_domain)
    assert float(leak) == 0.0  # zero outside the geometry
    return float(error)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _darcy_error_and_leak(n, half_domain: bool):
    t = jnp.linspace(0.0, 1.0, n + 1)
    xs, ys = jnp.meshgrid(t, t, indexing="ij")
    k = lambda x, y: 1.0 + 0.5 * jnp.sin(jnp.pi * x) * jnp.cos(jnp.pi * y)
    freq = 2.0 if half_domain else 1.0
    u = lambda x, y: jnp.sin(freq * jnp.pi * x) * jnp.sin(jnp.pi * y)
    flux = [lambda x, y: k(x, y) * jax.grad(u, 0)(x, y), lambda x, y: k(x, y) * jax.grad(u, 1)(x, y)]
    f = lambda x, y: -(jax.grad(flux[0], 0)(x, y) + jax.grad(flux[1], 1)(x, y))
    xi, yi = xs[1:-1, 1:-1], ys[1:-1, 1:-1]
    mask = (xi < 0.5 - 1e-6) if half_domain else jnp.ones_like(xi, bool)
    solution = pde.solve_darcy(k(xs, ys), jax.vmap(jax.vmap(f))(xi, yi), mask, tol=1e-7)
    return jnp.abs(solution - jnp.where(mask, u(xi, yi), 0.0)).max(), jnp.abs(jnp.where(mask, 0.0, solution)).max()


@pytest.mark.parametrize("half_domain", [pytest.param(False, marks=pytest.mark.slow), True], ids=["square", "masked_half"])
def test_darcy_solver_is_second_order(half_domain):
    errors = [darcy_error(n, half_domain) for n in (8, 16, 32)]
    assert np.all(observed_orders(errors) > 1.8), errors


def test_masked_loss_ignores_masked_out_points():
    rng = np.random.default_rng(0)
    pred, value = rng.standard_normal((2, 3, 10)).astype(np.float32)
    mask = (rng.random((3, 10)) < 0.6).astype(np.float32)
    mask[2] = 0.0  # an example with no valid point
    target = np.stack([value, mask], axis=-1)
    expected = [((pred[b] - value[b]) ** 2 * mask[b]).sum() / max(mask[b].sum(), 1.0) for b in range(3)]
    np.testing.assert_allclose(masked_mse(pred, target), expected, rtol=1e-6)
    off = mask == 0
    changed_pred = np.where(off, pred + 100.0, pred)
    changed_target = np.stack([np.where(off, value - 50.0, value), mask], axis=-1)
    np.testing.assert_allclose(masked_mse(changed_pred, changed_target), masked_mse(pred, target), rtol=1e-6)
    np.testing.assert_allclose(relative_l2(changed_pred, changed_target), relative_l2(pred, target), rtol=1e-6)
    assert not np.allclose(masked_mse(np.where(off, pred, pred + 1.0), target)[:2], masked_mse(pred, target)[:2])
    expected_rel = [np.linalg.norm((pred[b] - value[b]) * mask[b]) / np.linalg.norm(value[b] * mask[b])
                    for b in range(2)]
    np.testing.assert_allclose(relative_l2(pred, target)[:2], expected_rel, rtol=1e-5)


def deeponet_config(grid_shape=(4, 5)):
    return ml_collections.ConfigDict(dict(name="deeponet", arch_kwargs=dict(
        grid_shape=grid_shape, branch_features=(8,), trunk_features=(8, 4))))


def test_incompatible_tasks_and_inputs_fail_naming_them():
    with pytest.raises(ValueError, match="task 'digit' is of kind 'classification'"):
        build_model(deeponet_config(), (pde.field_task("ok", 20), T.classification("digit", 10)))
    with pytest.raises(ValueError, match="task 'ok' has 20 outputs but the model's grid has 12 points"):
        build_model(deeponet_config((3, 4)), (pde.field_task("ok", 20),))
    model = build_model(deeponet_config(), (pde.field_task("a", 20), pde.field_task("b", 20)))
    with pytest.raises(ValueError, match=r"num_tasks=2, n_in\]"):
        model.init(jax.random.key(0), jnp.zeros((3, 28, 28, 1)))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((3, 2, 6)))
    assert set(variables["params"]["heads"]) == {"a", "b"}
    assert {"branch", "trunk"} <= set(variables["params"]["shared"])


def test_pde_datasets_records_and_single_task_subsets():
    cfg = ml_collections.ConfigDict(dict(name="pde_fisher", num_train=8, num_test=4, seed=0, tasks=()))
    full = get_dataset(cfg)
    assert full.task_names == tuple(pde.FISHER_FAMILIES)
    record = full.splits["train"][0]
    num_points = int(np.prod(pde.fisher_grid_shape()))
    assert record["branch"].shape == (3, 2 * pde.FISHER_GRID["nx"]) and record["sine"].shape == (num_points, 2)
    cfg.tasks = ("cubic",)
    single = get_dataset(cfg)
    np.testing.assert_array_equal(single.splits["train"].arrays["branch"][:, 0],
                                  full.splits["train"].arrays["branch"][:, 2])
    np.testing.assert_array_equal(single.splits["test"].arrays["cubic"], full.splits["test"].arrays["cubic"])


def test_smoke_training_loss_falls():
    config = load_config(f"{CONFIG}:smoke", ["optim.schedule='constant'", "optim.lr=3e-3"])
    dataset = get_dataset(config.data)
    exp = build_experiment(config, dataset)
    batch = {k: v[:64] for k, v in dataset.splits["train"].arrays.items()}
    state = exp.init()
    losses = []
    for _ in range(30):
        state, out = exp.train_step(state, batch)
        losses.append(np.asarray(out["losses"]))
    assert np.all(losses[-1] < 0.5 * losses[0]), (losses[0], losses[-1])
