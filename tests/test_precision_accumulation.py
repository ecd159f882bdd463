"""Pod features of the step: mixed precision (float32 masters, bfloat16 forward), gradient
accumulation with MTL semantics, profiling chosen steps, and the combinations refused at start."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data.pipeline import to_global
from mtl_jax.errors import UsageError
from mtl_jax.train.forward import make_forward
from mtl_jax.train.gradients import layerwise as L
from mtl_jax.train.precision import cast_params, precision_policy
from mtl_jax.train.trainer import build_experiment, train_and_evaluate

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_of(name, *overrides):
    config = load_config(os.path.join(CONFIGS, name))
    return apply_overrides(config, ["progress_bar=False"] + list(overrides))


def first_batch(exp, size):
    keys = [exp.dataset.input_key] + [t.label_key for t in exp.dataset.tasks]
    return {k: np.stack([exp.dataset.splits["train"][i][k] for i in range(size)]) for k in keys}


def steps_of(config, batches=2, size=64):
    exp = build_experiment(config)
    state = exp.init()
    outs = []
    for i in range(batches):
        batch = first_batch(exp, size * (i + 1))
        batch = {k: v[size * i:] for k, v in batch.items()}
        state, out = exp.train_step(state, to_global(batch, exp.data_sharding))
        outs.append(jax.device_get(out))
    return jax.device_get(state), outs


@pytest.mark.parametrize("method", ["uw", "upgrad"])
def test_accumulated_micro_batches_equal_the_full_batch(method):
    full, full_out = steps_of(config_of("digits_mlp.py", f"method.name='{method}'"))
    micro, micro_out = steps_of(config_of("digits_mlp.py", f"method.name='{method}'", "grad_accum_steps=4"))
    for a, b in zip(jax.tree.leaves((full.params, full.opt_state, full.method_state, full.metric_sums)),
                    jax.tree.leaves((micro.params, micro.opt_state, micro.method_state, micro.metric_sums))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for a, b in zip(full_out, micro_out):
        np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
        if method != "ew":
            np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-4, atol=1e-6)


def test_accumulation_refused_with_sharpness_steps():
    with pytest.raises(UsageError, match="grad_accum_steps > 1 applies to the parameter-level plain step"):
        build_experiment(config_of("digits_mlp.py", "grad_accum_steps=2", "sharpness.kind='sam'"))


def test_bfloat16_keeps_float32_masters_gradients_and_gramian():
    config = config_of("digits_mlp.py", "precision='bfloat16'", "method.name='upgrad'")
    exp = build_experiment(config)
    state = exp.init()
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    state, out = exp.train_step(state, to_global(first_batch(exp, 64), exp.data_sharding))
    assert bool(out["applied"]) and out["losses"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.opt_state))
               if jnp.issubdtype(x.dtype, jnp.floating))

    # The layer-wise Gramian still finds the (cast) shared Dense layers and is float32, close to float32's.
    params, batch = state.params, first_batch(exp, 64)
    batch = jax.tree.map(jnp.asarray, batch)
    gramians = {}
    for name in ("float32", "bfloat16"):
        forward = make_forward(exp.model, exp.dataset.tasks, exp.dataset.input_key, precision_policy(name))
        fn = lambda p: forward(p, {}, batch, jax.random.key(0), True)[0]
        cast = lambda p, name=name: cast_params(precision_policy(name), p)
        losses, _, rows_fn = L.vjp_and_layerwise_gramian(fn, params, lambda p: p["shared"], prepare=cast)
        rows = rows_fn(jnp.eye(3))
        assert len(rows.dense) == 2 and rows.rest == []  # both Dense layers covered
        gramians[name] = L.layerwise_gramian(rows)
    assert gramians["bfloat16"].dtype == jnp.float32
    np.testing.assert_allclose(gramians["bfloat16"], gramians["float32"], rtol=5e-2,
                               atol=5e-2 * float(jnp.abs(gramians["float32"]).max()))


def test_precision_policy_keeps_the_named_parameters_in_float32():
    params = {"shared": {"dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                         "layer_norm": {"scale": jnp.ones(2)}}, "heads": {"a": {"kernel": jnp.ones((2, 1))}},
              "step": jnp.zeros((), jnp.int32)}
    cast = cast_params(precision_policy("bfloat16", r"norm|bias"), params)
    dtypes = {k: v.dtype for k, v in jax.tree_util.tree_leaves_with_path(cast) for k in [jax.tree_util.keystr(k)]}
    assert dtypes == {"['heads']['a']['kernel']": jnp.bfloat16, "['shared']['dense_0']['bias']": jnp.float32,
                      "['shared']['dense_0']['kernel']": jnp.bfloat16, "['shared']['layer_norm']['scale']": jnp.float32,
                      "['step']": jnp.int32}
    with pytest.raises(UsageError, match="precision"):
        load_config(os.path.join(CONFIGS, "digits_mlp.py"), ["precision='float16'"])


def test_bfloat16_loss_curve_tracks_float32_on_multimnist(tmp_path):
    overrides = ["num_steps=60", "batch_size=64", "log_every=10", "data.num_train=2048", "data.num_test=256",
                 "checkpoint.enabled=False", "eval_batch_size=256"]
    curves = {}
    for name in ("float32", "bfloat16"):
        workdir = tmp_path / name
        train_and_evaluate(config_of("multimnist.py", f"precision='{name}'", *overrides), str(workdir))
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        curves[name] = np.array([[r["left/loss"], r["right/loss"]] for r in rows if r["split"] == "train"])
    assert curves["float32"][-1].mean() < 0.7 * curves["float32"][0].mean()  # it learns
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=0.1)


def test_profile_steps_write_a_trace(tmp_path):
    train_and_evaluate(config_of("digits_mlp.py", "num_steps=4", "profile_steps=(3,)", "checkpoint.enabled=False"),
                       str(tmp_path))
    assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
