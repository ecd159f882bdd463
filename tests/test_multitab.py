"""MultiTab-Net (masked multitask attention) and the MultiTab-Bench generator."""

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
from mtl_jax.data.multitab_bench import make_multitab_bench
from mtl_jax.data.sources import read_all
from mtl_jax.models import build_model
from mtl_jax.models.multitab import multitask_attention_mask
from mtl_jax.train.trainer import build_experiment

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "multitab_bench.py")
TASKS = (T.regression("a"), T.classification("b", 3), T.regression("c"))


def model_config(**arch_kwargs):
    arch = dict(dim=8, depth=1, num_heads=2, mlp_dim=16) | arch_kwargs
    return ml_collections.ConfigDict(dict(name="multitab", head="linear", head_kwargs={}, arch_kwargs=arch))


def test_attention_mask_matches_its_definition():
    d, t = 3, 2
    for mask_tasks in (False, True):
        for mask_f2t in (False, True):
            expected = np.ones((d + t, d + t), bool)
            for q in range(d + t):
                for k in range(d + t):
                    if mask_tasks and q >= d and k >= d and q != k:
                        expected[q, k] = False
                    if mask_f2t and q < d and k >= d:
                        expected[q, k] = False
            np.testing.assert_array_equal(multitask_attention_mask(d, t, mask_tasks, mask_f2t), expected)


X = jax.random.normal(jax.random.key(0), (4, 5))


def _cross_task_sensitivity(depth, mask_tasks, mask_features_to_tasks):
    """max |d out_a / d token_c|: how much task a's prediction depends on task c's token."""
    model = build_model(model_config(depth=depth, mask_tasks=mask_tasks,
                                     mask_features_to_tasks=mask_features_to_tasks), TASKS)
    params = _params(depth)

    def out_a(token_c):
        tokens = params["shared"]["task_tokens"] | {"c": token_c}
        p = {"heads": params["heads"], "shared": params["shared"] | {"task_tokens": tokens}}
        return model.apply({"params": p}, X)["a"].sum()

    return float(jnp.abs(jax.jit(jax.grad(out_a))(params["shared"]["task_tokens"]["c"])).max())


@functools.cache
def _params(depth):
    """The masks have no parameters: one initialisation per depth serves every mask setting."""
    return jax.jit(build_model(model_config(depth=depth), TASKS).init)(jax.random.key(1), X)["params"]


def test_task_tokens_do_not_see_each_other():
    # One block, task-task mask: task a reads features and itself only.
    assert _cross_task_sensitivity(1, True, False) == 0.0
    assert _cross_task_sensitivity(1, False, False) > 1e-4
    # Two blocks: features carry task c's token to task a unless features may not attend to tasks.
    assert _cross_task_sensitivity(2, True, False) > 1e-4
    assert _cross_task_sensitivity(2, True, True) == 0.0


def test_param_tree_and_outputs():
    model = build_model(model_config(), TASKS)
    x = jnp.ones((2, 5))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    assert set(params) == {"shared", "heads"} and set(params["heads"]) == {"a", "b", "c"}
    assert set(params["shared"]["task_tokens"]) == {"a", "b", "c"}
    out = jax.jit(model.apply)({"params": params}, x)
    assert {k: v.shape for k, v in out.items()} == {"a": (2, 1), "b": (2, 3), "c": (2, 1)}


def test_image_input_fails_at_init_naming_the_problem():
    model = build_model(model_config(), TASKS)
    with pytest.raises(ValueError, match=r"tabular input \[batch, num_features\]; got shape \(2, 8, 8, 1\)"):
        model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
    digits = load_config("configs/digits_mlp.py")
    digits.model = model_config()
    with pytest.raises(ValueError, match="MultiTab-Net takes tabular input"):
        build_experiment(digits)


def _offdiag_corr(y):
    c = np.corrcoef(y.T)
    return c[~np.eye(len(c), dtype=bool)].mean()


def test_correlation_knob_sets_the_measured_task_correlation():
    for rho in (0.0, 0.4, 0.8):
        splits, _ = make_multitab_bench(4000, 10, num_tasks=3, correlation=rho, degrees=(1, 1, 1), seed=1)
        y = np.concatenate([splits["train"][f"task_{t}"] for t in range(3)], axis=1)
        assert abs(_offdiag_corr(y) - rho) < 0.05, (rho, _offdiag_corr(y))
    with pytest.raises(ValueError, match="indefinite"):
        make_multitab_bench(10, 10, num_tasks=3, correlation=-0.9)


def test_generator_knobs_are_config_keys_of_their_dataset_only():
    """``--config.data.correlation=...`` reaches the generator; the same key is refused for a
    dataset that does not read it, and the error lists the dataset's valid keys."""
    config = load_config(f"{CONFIG}:smoke", ["data.correlation=0.8", "data.num_tasks=4", "data.degrees=(1, 1, 1, 1)",
                                             "data.num_train=2000", "data.num_test=10"])
    assert config.data.correlation == 0.8 and config.data.degrees == (1, 1, 1, 1)
    data = get_dataset(config.data)
    assert data.task_names == ("task_0", "task_1", "task_2", "task_3")
    train = read_all(data.splits["train"])
    y = np.stack([np.asarray(train[t], np.float64).reshape(-1) for t in ("task_0", "task_2")], axis=1)
    assert abs(_offdiag_corr(y) - 0.8) < 0.06
    with pytest.raises(KeyError, match=r"unknown config key 'data.correlation'.*'num_train'"):
        load_config(os.path.join(os.path.dirname(CONFIG), "multimnist.py"), ["data.correlation=0.8"])
    with pytest.raises(KeyError, match=r"unknown config key 'data.corelation'.*'correlation'"):
        load_config(CONFIG, ["data.corelation=0.8"])


def _linear_r2(x, y):
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return 1.0 - np.mean((design @ coef - y) ** 2) / np.var(y)


def test_complexity_knob_limits_what_a_linear_model_fits():
    splits, _ = make_multitab_bench(4000, 10, num_tasks=3, correlation=0.3, degrees=(1, 2, 4), seed=2)
    r2 = [_linear_r2(splits["train"]["features"], splits["train"][f"task_{t}"][:, 0]) for t in range(3)]
    assert r2[0] > 0.99, r2            # degree 1: linear in x
    assert r2[1] < 0.6 and r2[2] < 0.6, r2  # even powers are orthogonal to every linear function of x


def test_generator_is_deterministic_and_labels_classes_by_quantile():
    kinds = ("regression", "classification")
    a, specs = make_multitab_bench(500, 100, num_features=4, num_tasks=2, kinds=kinds, num_classes=4, seed=3)
    b, _ = make_multitab_bench(500, 100, num_features=4, num_tasks=2, kinds=kinds, num_classes=4, seed=3)
    c, _ = make_multitab_bench(500, 100, num_features=4, num_tasks=2, kinds=kinds, num_classes=4, seed=4)
    for split in a:
        for k in a[split]:
            np.testing.assert_array_equal(a[split][k], b[split][k])
    assert not np.array_equal(a["train"]["features"], c["train"]["features"])
    assert [s.kind for s in specs] == list(kinds)
    np.testing.assert_array_equal(np.bincount(a["train"]["task_1"]), [125] * 4)


def test_smoke_training_loss_falls():
    config = load_config(f"{CONFIG}:smoke", ["optim.schedule='constant'", "optim.lr=3e-3"])
    dataset = get_dataset(config.data)
    assert dataset.task_names == ("task_0", "task_1", "task_2")
    exp = build_experiment(config, dataset)
    train = dataset.splits["train"].arrays
    batch = {k: v[:64] for k, v in train.items()}
    state = exp.init()
    losses = []
    for _ in range(30):
        state, out = exp.train_step(state, batch)
        losses.append(np.asarray(out["losses"]))
    assert np.all(losses[-1] < 0.9 * losses[0]) and losses[-1].sum() < 0.6 * losses[0].sum(), (losses[0], losses[-1])
