"""Pod-scale training: FSDP (parameters and optimiser moments split over 'data'), rematerialised
trunk blocks (``config.remat``) and the GPU device script's dry run. Runs on the 8 fake CPU
devices of conftest.py."""

import contextlib
import functools
import inspect
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

import mtl_jax.train.trainer as trainer
from mtl_jax import tasks as T
from mtl_jax.config import apply_overrides, check_config, default_config, load_config
from mtl_jax.data.pipeline import to_global
from mtl_jax.errors import UsageError
from mtl_jax.models import build_model, remat_compiler_options
from mtl_jax.train import sharding
from mtl_jax.train.sharding import fsdp_spec, make_mesh, per_device_bytes, sharded_bytes, train_state_shardings

ROOT = os.path.join(os.path.dirname(__file__), "..")


@contextlib.contextmanager
def honouring_pod_keys(config):
    """``trainer.build_experiment`` honouring ``config.remat`` and ``config.sharding.fsdp``: when
    trainer.py does not pass them on itself, its ``build_model`` / ``train_state_shardings`` are
    patched for the duration."""
    source = inspect.getsource(trainer.build_experiment)
    with pytest.MonkeyPatch.context() as mp:
        if "remat" not in source:
            mp.setattr(trainer, "build_model", functools.partial(build_model, remat=config.remat))
        if "fsdp" not in source:
            mp.setattr(trainer, "train_state_shardings",
                       functools.partial(train_state_shardings, fsdp=config.sharding.fsdp))
        yield


def build(config):
    with honouring_pod_keys(config):
        return trainer.build_experiment(config)


def digits_config(*overrides):
    config = load_config(os.path.join(ROOT, "configs", "digits_mlp.py"))
    config.progress_bar = False
    return apply_overrides(config, list(overrides))


def first_batch(exp, n):
    ds = exp.dataset
    keys = list(dict.fromkeys([ds.input_key] + [t.label_key for t in ds.tasks]))
    batch = {k: np.stack([ds.splits["train"][i][k] for i in range(n)]) for k in keys}
    return to_global(batch, exp.data_sharding)


def run_steps(exp, batch, steps):
    state, losses = exp.init(), []
    for _ in range(steps):
        state, out = exp.train_step(state, batch)
        losses.append(np.asarray(out["losses"]))
    return state, np.stack(losses)


def assert_trees_close(a, b, rtol, atol_scale):
    """Leaf by leaf: |a - b| <= rtol * |b| + atol_scale * max|b| (float rounding, not bitwise)."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_scale * float(np.abs(y).max() + 1e-30),
                                   err_msg=sharding.key_path_str(path))


# ---------------------------------------------------------------------------------------------- config


def test_config_keys_default_off_and_checked():
    config = default_config()
    assert config.remat is False and config.sharding.fsdp is False
    for key in ("remat=1", "sharding.fsdp='yes'"):
        bad = default_config()
        with pytest.raises(UsageError):
            apply_overrides(bad, [key])
            check_config(bad)
    config = digits_config("remat=True", "sharding.fsdp=True")
    check_config(config)
    assert config.remat and config.sharding.fsdp


# ---------------------------------------------------------------------------------------------- FSDP


def test_fsdp_spec_largest_divisible_dim_small_and_indivisible_replicated():
    mesh = make_mesh(8)
    assert fsdp_spec((64, 128), mesh) == P(None, "data")  # the larger dimension
    assert fsdp_spec((128, 128), mesh) == P("data", None)  # ties: the first
    assert fsdp_spec((768, 3072), mesh) == P(None, "data")
    assert fsdp_spec((3072, 100), mesh) == P("data", None)  # 100 % 8 != 0: the divisible one
    assert fsdp_spec((129, 127), mesh) == P()  # nothing divisible
    assert fsdp_spec((128,), mesh) == P()  # under FSDP_MIN_SIZE elements
    assert fsdp_spec((16, 16, 3, 768), mesh) == P(None, None, None, "data")  # ViT patch embedding
    assert fsdp_spec((64, 128), make_mesh(1)) == P()  # one device on 'data'
    assert fsdp_spec((64, 128), make_mesh(4, model=2)) == P(None, "data")


def test_fsdp_rules_win_and_moments_follow_params():
    config = digits_config("sharding.fsdp=True", "sharding.rules=(('dense_1/kernel', ('model', None)),)",
                           "mesh.data=4", "mesh.model=2")
    exp = build(config)
    params, opt = exp.state_shardings.params, exp.state_shardings.opt_state
    assert params["shared"]["dense_0"]["kernel"].spec == P(None, "data")
    assert params["shared"]["dense_1"]["kernel"].spec == P("model", None)  # the explicit rule
    assert params["shared"]["dense_0"]["bias"].spec == P()
    assert params["heads"]["digit"]["out"]["kernel"].spec == P()  # 128 x 10: small
    specs = {sharding.key_path_str(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(opt)}
    moments = [k for k in specs if k.startswith("shared/") and k.endswith("/dense_0/kernel")]
    assert len(moments) >= 2 and all(specs[k] == P(None, "data") for k in moments), specs  # Adam mu, nu


def test_fsdp_step_equals_replicated_step_and_params_take_an_eighth():
    """UPGrad (the layer-wise Gramian reads the sharded kernels) with Adam, 3 steps on digits."""
    runs, states = {}, {}
    for fsdp in (False, True):
        exp = build(digits_config(f"sharding.fsdp={fsdp}", "mesh.data=8", "method.name=upgrad"))
        state, losses = run_steps(exp, first_batch(exp, 64), 3)
        runs[fsdp], states[fsdp] = (jax.device_get(state.params), jax.device_get(state.opt_state), losses), state
        if fsdp:  # the trunk kernels (64 x 128, 128 x 128) and their Adam moments: 1/8 per device
            big = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state))
                   if sharding.key_path_str(path).endswith(("dense_0/kernel", "dense_1/kernel"))]
            assert len(big) == 6  # params, mu, nu
            assert per_device_bytes(big) == sum(x.nbytes for x in big) // 8
            # the abstract estimate the benchmark prints agrees with the arrays
            assert sharded_bytes(exp.abstract_state.params, exp.state_shardings.params) == per_device_bytes(
                state.params)
    total = lambda s: per_device_bytes(s.params) + per_device_bytes(s.opt_state)
    assert total(states[True]) < 0.3 * total(states[False])  # heads and biases stay replicated
    for got, want in zip(runs[True], runs[False]):  # GSPMD sums the batch shards in another order
        assert_trees_close(got, want, rtol=1e-4, atol_scale=1e-5)


# ---------------------------------------------------------------------------------------------- remat


def model_cfg(trunk, **trunk_kwargs):
    return ConfigDict(dict(name="hps", trunk=trunk, trunk_kwargs=trunk_kwargs, head="linear", head_kwargs={},
                           arch_kwargs={}))


TASKS = (T.classification("a", 10), T.regression("b", 2))
TRUNK_CASES = {
    "vit": (model_cfg("vit", patch_size=4, dim=32, depth=2, num_heads=4, mlp_dim=64, dropout=0.1), (4, 16, 16, 3)),
    "mlp": (model_cfg("mlp", features=(32, 32), batch_norm=True, dropout=0.2), (4, 8, 8, 1)),
    "lenet": (model_cfg("lenet", dropout=0.2), (4, 28, 28, 1)),
}


@pytest.mark.parametrize("trunk", sorted(TRUNK_CASES))
def test_remat_same_parameters_outputs_gradients_and_state(trunk):
    cfg, shape = TRUNK_CASES[trunk]
    x = jax.random.uniform(jax.random.key(0), shape)
    rngs = {"dropout": jax.random.key(2)}
    results = {}
    for remat in (False, True):
        model = build_model(cfg, TASKS, remat=remat)
        variables = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x, train=False)
        params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

        def loss(p):
            out, new = model.apply({"params": p, **rest}, x, train=True, rngs=rngs, mutable=list(rest))
            return sum(jnp.sum(v ** 2) for v in jax.tree.leaves(out)), (out, new)

        (value, (out, new_state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[remat] = (params, value, out, new_state, grads)
    assert jax.tree.structure(results[True][0]) == jax.tree.structure(results[False][0])  # same paths
    assert "remat" not in str(jax.tree_util.tree_leaves_with_path(results[True][0]))
    for got, want in zip(results[True], results[False]):
        assert_trees_close(got, want, rtol=1e-5, atol_scale=1e-6)


@pytest.mark.parametrize("name", ["mmoe", "dselect_k"])
def test_remat_on_mixture_of_experts_trunks_keeps_parameter_paths(name):
    """Experts are stacked copies of the trunk (nn.scan / nn.vmap around the remat layers): traced only."""
    cfg = model_cfg("mlp", features=(16, 16))
    cfg.name, cfg.arch_kwargs = name, {"num_experts": 3}
    x = jnp.zeros((4, 8))
    shapes = {}
    for remat in (False, True):
        model = build_model(cfg, TASKS, remat=remat)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
        loss = lambda p: sum(jnp.sum(v) for v in jax.tree.leaves(model.apply({"params": p}, x, train=True)))
        shapes[remat] = (params, jax.eval_shape(jax.grad(loss), params))
    assert shapes[True] == shapes[False]


def test_remat_refused_where_the_model_builds_its_own_blocks():
    cfg = model_cfg("vit")
    cfg.name = "unifork"
    with pytest.raises(UsageError, match="remat"):
        build_model(cfg, TASKS, remat=True)


def test_remat_lowers_xla_temp_memory_of_a_vit_gradient():
    """XLA's memory analysis of value_and_grad through a 4-block ViT (dim 128, 64 tokens): remat
    keeps only each block's input; measured 29.4 MB -> 9.5 MB of temporaries at batch 8."""
    cfg = model_cfg("vit", patch_size=4, dim=128, depth=4, num_heads=4, mlp_dim=512)
    x = jnp.zeros((8, 32, 32, 3))
    temp = {}
    for remat in (False, True):
        model = build_model(cfg, TASKS, remat=remat)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
        loss = lambda p: sum(jnp.sum(v ** 2) for v in jax.tree.leaves(model.apply({"params": p}, x, train=True)))
        compiled = jax.jit(jax.grad(loss)).lower(params).compile(remat_compiler_options(remat))
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.5 * temp[False], temp


def test_remat_keeps_the_layerwise_gramian_step_exact():
    """UPGrad's layer-wise Gramian treats Dense layers under nn.remat as uncovered (explicit rows): the
    same step as without remat, to float rounding."""
    runs = {}
    for remat in (False, True):
        exp = build(digits_config("method.name=upgrad", "jacobian.gramian_mode=layerwise", f"remat={remat}",
                                  "mesh.data=8"))
        state, losses = run_steps(exp, first_batch(exp, 64), 2)
        runs[remat] = (jax.device_get(state.params), losses)
    # Dense rows <D_k, X X^T D_l> vs explicit rows X^T D_k: another summation order, which UPGrad's QP
    # and Adam's normalisation carry into the parameters (measured: 2e-5 relative on 1 of 16384 entries)
    for got, want in zip(runs[True], runs[False]):
        assert_trees_close(got, want, rtol=1e-4, atol_scale=1e-5)


def test_remat_and_fsdp_together_train_step_runs_with_cpu_compiler_options():
    config = digits_config("remat=True", "sharding.fsdp=True", "mesh.data=8")
    exp = build(config)
    batch = first_batch(exp, 64)
    state = exp.init()
    compiled = exp.train_step.lower(state, batch).compile(remat_compiler_options(True))
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    new_state, out = compiled(state, batch)
    assert bool(out["applied"]) and np.isfinite(np.asarray(out["losses"])).all()


# ---------------------------------------------------------------------------------------------- device script


def test_gpu_device_script_dry_run_on_cpu(tmp_path):
    """The device script end to end at its dry-run size (one configuration; --peak-tflops so that the
    MFU arithmetic runs without a GPU)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-m", "benchmarks.device.scale_gpu", "--dry-run",
                          "--methods", "ew", "--precisions", "float32", "--peak-tflops", "1",
                          "--json", str(tmp_path / "out.json")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "images/s" in out.stdout and "MFU" in out.stdout
    row = json.load(open(tmp_path / "out.json"))["rows"][0]
    assert row["applied"] and row["images_per_s"] > 0 and row["mfu"] > 0 and row["hfu"] > 0
    assert row["model_flops_per_step"] == 6 * row["params"] * 8 * 16  # batch 8 x (32 / 8)^2 tokens
