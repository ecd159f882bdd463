"""Training: real-data learning, sharding, resume, per-task optimisers, NaN steps, config errors."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from mtl_jax import tasks as T
from mtl_jax.config import apply_overrides, load_config, validate
from mtl_jax.data import from_arrays, get_dataset
from mtl_jax.data.pipeline import to_global
from mtl_jax.main import main
from mtl_jax.train.reporting import delta_m
from mtl_jax.train.trainer import NonFiniteError, build_experiment, train_and_evaluate

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


def digits_config(*overrides):
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "digits_mlp.py"))
    config.progress_bar = False
    return apply_overrides(config, list(overrides))


def batch_of(dataset, n=64, split="train", offset=0):
    keys = [dataset.input_key] + [t.label_key for t in dataset.tasks]
    return {k: np.stack([dataset.splits[split][offset + i][k] for i in range(n)]) for k in keys}


def test_real_data_loss_falls_and_beats_chance(tmp_path):
    config = digits_config("num_steps=300", "log_every=20", "checkpoint.enabled=False")
    out = train_and_evaluate(config, str(tmp_path))
    res = out["results"]
    assert res["digit"]["accuracy"] > 0.85, res  # chance: 0.10
    assert res["parity"]["accuracy"] > 0.85, res  # chance: 0.50
    assert res["ink"]["mse"] < 0.5, res  # predicting the mean scores ~1.0 (standardised target)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train = [l for l in lines if l["split"] == "train"]
    assert train[-1]["digit/loss"] < 0.3 * train[0]["digit/loss"]
    assert train[-1]["ink/mse"] < 0.7 * train[0]["ink/mse"]
    assert (tmp_path / "results.md").exists() and json.load(open(tmp_path / "results.json"))["tasks"] == [
        "digit", "parity", "ink"]
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_multimnist_learns_both_tasks(tmp_path, data_dir):
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "multimnist.py"))
    apply_overrides(config, ["data.num_train=4096", "data.num_test=512", "num_steps=80", "batch_size=128",
                             "baselines=''", "checkpoint.enabled=False", "progress_bar=False"])
    res = train_and_evaluate(config, str(tmp_path))["results"]
    # measured 64.6% / 54.9% after these 80 steps; chance: 10%
    assert res["left"]["accuracy"] > 0.4 and res["right"]["accuracy"] > 0.4, res


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sharded_step_matches_single_device():
    dataset = get_dataset(digits_config().data)
    batch = batch_of(dataset, 64)
    results = []
    for mesh, rules in [((1, 1), ()), ((4, 2), ((r"shared/dense_0/kernel$", (None, "model")),
                                                  (r"shared/dense_1/kernel$", ("model", None))))]:
        config = digits_config(f"mesh.data={mesh[0]}", f"mesh.model={mesh[1]}")
        config.sharding.rules = rules
        exp = build_experiment(config, dataset)
        assert exp.mesh.devices.size == mesh[0] * mesh[1]
        state = exp.init()
        if rules:
            kernel = state.params["shared"]["dense_0"]["kernel"]
            assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
            assert {s.data.shape for s in kernel.addressable_shards} == {(kernel.shape[0], kernel.shape[1] // 2)}
            mu = state.opt_state["shared"][0].mu["dense_0"]["kernel"]
            assert mu.sharding.spec == kernel.sharding.spec  # Adam moments follow the rule too
        for _ in range(3):
            state, _ = exp.train_step(state, to_global(batch, exp.data_sharding))
        results.append(jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_killed_run_resumes_to_identical_params(tmp_path):
    config = digits_config("num_steps=24", "checkpoint.every=5", "log_every=4")
    uninterrupted = train_and_evaluate(config, str(tmp_path / "a"))["state"]

    class Preempted(Exception):
        pass

    def kill_at_13(step, state):
        if step == 13:
            raise Preempted

    with pytest.raises(Preempted):
        train_and_evaluate(config, str(tmp_path / "b"), on_step=kill_at_13)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["10", "5"]
    resumed = train_and_evaluate(config, str(tmp_path / "b"))["state"]
    assert int(resumed.step) == 24
    assert _leaves_equal(uninterrupted.params, resumed.params)
    assert _leaves_equal(uninterrupted.opt_state, resumed.opt_state)


def test_per_task_optimisers_head_with_zero_lr_stays_put():
    config = digits_config("head_optim.parity.lr=0.0", "head_optim.ink.name='sgd'", "head_optim.ink.lr=0.1")
    exp = build_experiment(config, get_dataset(config.data))
    state = exp.init()
    before = jax.device_get(state.params)
    assert type(state.opt_state["heads"]["ink"][0]).__name__ == "EmptyState"  # plain SGD: no moments
    assert type(state.opt_state["heads"]["digit"][0]).__name__ == "ScaleByAdamState"
    for i in range(3):
        state, _ = exp.train_step(state, to_global(batch_of(exp.dataset, 64, offset=64 * i), exp.data_sharding))
    after = jax.device_get(state.params)
    assert _leaves_equal(before["heads"]["parity"], after["heads"]["parity"])
    assert not _leaves_equal(before["heads"]["digit"], after["heads"]["digit"])
    assert not _leaves_equal(before["heads"]["ink"], after["heads"]["ink"])
    assert not _leaves_equal(before["shared"], after["shared"])


def test_nonfinite_step_is_skipped_and_counted():
    config = digits_config()
    exp = build_experiment(config, get_dataset(config.data))
    state = exp.init()
    good = batch_of(exp.dataset, 64)
    bad = dict(good, ink=good["ink"].copy())
    bad["ink"][3] = np.nan
    state, out = exp.train_step(state, to_global(good, exp.data_sharding))
    before = jax.device_get((state.params, state.opt_state))
    state, out = exp.train_step(state, to_global(bad, exp.data_sharding))
    assert not bool(out["applied"])
    assert np.asarray(out["nonfinite_tasks"]).tolist() == [False, False, True]
    assert int(state.nonfinite_total) == 1 and int(state.nonfinite_streak) == 1 and int(state.step) == 2
    assert _leaves_equal(before, jax.device_get((state.params, state.opt_state)))
    state, out = exp.train_step(state, to_global(good, exp.data_sharding))
    assert bool(out["applied"]) and int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 1


def test_run_stops_naming_the_nonfinite_task_and_writes_no_checkpoint(tmp_path):
    base = get_dataset(digits_config().data)
    arrays = {s: dict(src.arrays) for s, src in base.splits.items()}
    arrays["train"]["ink"] = np.where(np.arange(len(arrays["train"]["ink"]))[:, None] >= 0, np.inf, 0.0).astype(
        np.float32)
    dataset = from_arrays("digits_inf", arrays, base.tasks)
    config = digits_config("num_steps=50", "max_nonfinite_steps=4", "checkpoint.every=2")
    with pytest.raises(NonFiniteError, match=r"4 consecutive steps skipped.*task\(s\) \['ink'\]"):
        train_and_evaluate(config, str(tmp_path), dataset=dataset)
    assert os.listdir(tmp_path / "checkpoints") == []  # every step was skipped: nothing to save


def test_config_errors_name_the_key():
    config = digits_config()
    with pytest.raises(KeyError, match=r"unknown config key 'optim.lrr'; valid keys under 'optim'.*'lr'"):
        apply_overrides(config, ["optim.lrr=0.1"])
    with pytest.raises(KeyError, match=r"unknown config key 'chekpoint'"):
        apply_overrides(config, ["chekpoint.every=3"])
    config = digits_config()
    with config.unlocked():
        config.model.depth = 3
    with pytest.raises(KeyError, match=r"unknown config key 'model.depth'"):
        validate(config)
    with pytest.raises(ValueError, match=r"unknown MTL method 'nashmtl'; valid names: \[.*'ew'"):
        build_experiment(digits_config("method.name='nashmtl'"))
    with pytest.raises(ValueError, match=r"head_optim names unknown task\(s\) \['colour'\]"):
        build_experiment(digits_config("head_optim.colour.lr=0.0"))
    with pytest.raises(ValueError, match=r"unknown optimiser 'lamb'; valid names"):
        build_experiment(digits_config("optim.name='lamb'"))
    with pytest.raises(ValueError, match=r"sharding rule .* matches 'shared/dense_0/kernel'"):
        build_experiment(digits_config("sharding.rules=(('dense_0/kernel', ('model',)),)", "mesh.model=2"))


def test_cli_trains_and_rejects_unknown_keys(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "digits_mlp.py")
    out = main(["train", f"--config={path}:smoke", f"--workdir={tmp_path}", "--config.num_steps=4",
                "--config.progress_bar=False"])
    assert out["steps"] == 4 and (tmp_path / "results.md").exists()
    with pytest.raises(KeyError, match="unknown config key 'optim.learning_rate'"):
        main(["train", f"--config={path}:smoke", f"--workdir={tmp_path}/x", "--config.optim.learning_rate=1"])


# Configs whose model has its own smoke-training test (tests/test_architectures.py, test_moe_vit.py,
# test_unifork_taskexpert.py, test_multitab.py, test_deeponet_pde.py): their end-to-end config run is
# slow-only; the default run still loads and validates every config (test_every_config_loads).
SLOW_CONFIGS = {"multimnist_m3vit.py", "multimnist_mod_squad.py", "multimnist_taskexpert.py",
                "multimnist_unifork.py", "multimnist_mmoe.py", "multimnist_dselect_k.py", "multimnist_mtan.py",
                "multimnist_cgc.py", "multimnist_ple.py", "multimnist_cross_stitch.py", "multimnist_vit.py",
                "multitab_bench.py", "pde_darcy.py", "multimnist_ltb.py",
                "multimnist.py",  # trained for 80 steps by test_multimnist_learns_both_tasks
                # the same MTAN-SegNet as nyuv2_mtan.py's smoke run (one smoke run per dense model)
                "cityscapes_mtan.py", "rendered_scenes_mtan.py"}  # :smoke parsing by test_every_config_loads


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_loads(path):
    config = load_config(f"{path}:smoke")
    assert config.num_steps == 20 and config.model.name


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW_CONFIGS else p
                                  for p in CONFIGS], ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_smoke_runs(path, tmp_path, data_dir):
    config = load_config(f"{path}:smoke")
    config.progress_bar = False
    out = train_and_evaluate(config, str(tmp_path))
    assert out["steps"] == config.num_steps
    for metrics in out["results"].values():
        assert all(np.isfinite(v) for v in metrics.values())


def test_delta_m_matches_hand_computation():
    tasks = (T.classification("a", 10), T.regression("b"))
    results = {"a": {"accuracy": 0.9}, "b": {"mae": 0.5}}
    baselines = {"a": {"accuracy": 0.8}, "b": {"mae": 0.4}}
    # a: -(0.9-0.8)/0.8 = -12.5%; b: +(0.5-0.4)/0.4 = +25%  -> mean 6.25
    assert delta_m(results, baselines, tasks) == pytest.approx(6.25)


# The architectures whose MultiMNIST config run is slow-only (SLOW_CONFIGS) train end to end here on
# scikit-learn digits with small MLP encoders / a tiny MoE ViT: the same trainer path in a few seconds.
FAST_ARCHITECTURES = {
    "mmoe": ("model.trunk_kwargs.features=(32,)", "model.arch_kwargs.num_experts=2"),
    "cgc": ("model.trunk_kwargs.features=(32,)",),
    "dselect_k": ("model.trunk_kwargs.features=(32,)", "model.arch_kwargs.num_experts=3"),
    "ple": ("model.trunk_kwargs.features=(32,16)",),
    "mtan": ("model.trunk_kwargs.features=(32,16)",),
    "cross_stitch": ("model.trunk_kwargs.features=(32,16)",),
    "ltb": ("model.trunk_kwargs.features=(32,16)", "model.arch_kwargs.epochs=1", "model.arch_kwargs.steps_per_epoch=30"),
    "m3vit": ("model.trunk_kwargs={}", "model.arch_kwargs.patch_size=4", "model.arch_kwargs.dim=16",
              "model.arch_kwargs.depth=2", "model.arch_kwargs.num_heads=2", "model.arch_kwargs.mlp_dim=16",
              "model.arch_kwargs.num_experts=4"),
}


@pytest.mark.parametrize("arch", sorted(FAST_ARCHITECTURES))
def test_architectures_train_end_to_end_on_digits(arch, tmp_path):
    config = digits_config(f"model.name='{arch}'", *FAST_ARCHITECTURES[arch], "num_steps=30",
                           "checkpoint.enabled=False", "optim.lr=3e-3")
    out = train_and_evaluate(config, str(tmp_path))
    assert out["steps"] == 30
    assert out["train_step_traces"] == 1  # routed / staged models: one trace for every step, none per step
    for metrics in out["results"].values():
        assert all(np.isfinite(v) for v in metrics.values())
    assert out["results"]["digit"]["accuracy"] > 0.2  # chance is 0.1


def test_a_zero_or_nan_baseline_fails_when_the_run_starts(tmp_path):
    """config.baselines is checked by reporting.check_baselines before the first step: a missing
    entry, a 0 or a NaN baseline (Delta-m% divides by each) fails naming the file and the entries."""
    from ml_collections import ConfigDict

    from mtl_jax.train.trainer import load_baselines

    tasks = (T.classification("a", 10), T.regression("b"))
    path = str(tmp_path / "baselines.json")

    def write(baselines):
        with open(path, "w") as f:
            f.write(json.dumps(baselines))  # json writes float('nan') as NaN, which json.load reads back

    def load(baselines):
        write(baselines)
        return load_baselines(ConfigDict({"baselines": path}), tasks)

    assert load({"a": {"accuracy": 0.8}, "b": {"mae": 0.4}}) == {"a": {"accuracy": 0.8}, "b": {"mae": 0.4}}
    with pytest.raises(ValueError, match=r"config.baselines '.*baselines.json' lack \['b/mae'\]"):
        load({"a": {"accuracy": 0.8}})
    with pytest.raises(ValueError, match=r"baselines.json' \['b/mae = 0.0'\] are not finite non-zero"):
        load({"a": {"accuracy": 0.8}, "b": {"mae": 0.0}})
    with pytest.raises(ValueError, match=r"\['a/accuracy = nan'\] are not finite non-zero"):
        load({"a": {"accuracy": float("nan")}, "b": {"mae": 0.4}})
    with pytest.raises(ValueError, match="must be a JSON object"):
        load([0.8, 0.4])
    # the run fails before its first step
    config = digits_config("num_steps=2", f"baselines='{path}'", "checkpoint.enabled=False")
    write({"digit": {"accuracy": 0.0}, "parity": {"accuracy": 0.9}, "ink": {"mae": 0.5}})
    steps = []
    with pytest.raises(ValueError, match=r"\['digit/accuracy = 0.0'\] are not finite non-zero"):
        train_and_evaluate(config, str(tmp_path / "run"), on_step=lambda step, state: steps.append(step))
    assert steps == []
