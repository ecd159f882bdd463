"""``python -m experiments.architectures`` end to end on a seconds-long stand-in, and the FLOPs helper.

The stand-in configs directory has the file names the script discovers (``multimnist.py`` = HPS,
``multimnist_<arch>.py``, ``pde_<x>.py``) holding tiny scikit-learn digits configs (an MLP trunk,
two tasks: a few steps compile and run in seconds).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from experiments import architectures as A
from experiments.common import CONFIGS, train_cached
from mtl_jax.models.flops import cost_flops, model_cost

DIGITS = os.path.join(CONFIGS, "digits_mlp.py")
TINY = f'''
from mtl_jax.config import load_config


def get_config(arg=None):
    config = load_config("{DIGITS}:smoke")
    config.data.tasks = config.data.tasks or ("digit", "parity")
    config.model.trunk_kwargs.features = (16,)
    config.num_steps = 6
    config.log_every = 2
    config.eval_batch_size = 512
    {{arch}}
    return config
'''


@pytest.fixture(scope="module")
def configs_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs")
    arch = {"multimnist.py": "", "multimnist_mmoe.py": "config.model.name = 'mmoe'; "
            "config.model.arch_kwargs.num_experts = 2", "pde_toy.py": ""}
    for name, body in arch.items():
        (path / name).write_text(TINY.replace("{arch}", body))
    return str(path)


def test_discovery_and_unknown_names(configs_dir):
    entries = A.discover_entries(configs_dir)
    assert list(entries) == ["hps", "mmoe", "pde_toy"]
    assert entries["mmoe"].baseline == entries["hps"].config  # MultiMNIST archs: the LeNet HPS reference
    assert entries["pde_toy"].baseline == entries["pde_toy"].config and entries["pde_toy"].family == "pde_toy"
    with pytest.raises(SystemExit, match=r"unknown architecture\(s\) \['lenet5'\]; valid: \['hps', 'mmoe'"):
        A.select(entries, "hps,lenet5")
    assert [e.name for e in A.select(entries, "mmoe,hps")] == ["mmoe", "hps"]  # the order they train in
    assert A.with_arg("a.py", "smoke") == "a.py:smoke" and A.with_arg("a.py:task=x", "smoke") == "a.py:task=x,smoke"


def test_script_writes_table_reports_failures_and_reuses_runs(configs_dir, data_dir, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("multimnist.py", "multimnist_mmoe.py"):
        (configs / name).write_text(open(os.path.join(configs_dir, name)).read())
    (configs / "multimnist_bad.py").write_text(TINY.replace("{arch}", "config.model.name = 'no_such_model'"))
    out = str(tmp_path / "table")
    args = ["--archs=mmoe,bad", "--seeds=3", f"--configs={configs}", f"--workdir={tmp_path / 'runs'}", f"--out={out}",
            f"--compile-cache={tmp_path / 'cache'}", "--full", "--config.checkpoint.enabled=False"]
    dump = A.main(args)
    family = json.load(open(out + ".json"))["multimnist"]
    assert family == json.loads(json.dumps(dump["multimnist"], default=lambda o: o.__dict__))
    baselines = family["baselines"]
    for task in ("digit", "parity"):  # single-task runs: one per task and seed, trained on that task only
        runs = family["single_task"][task]
        assert len(runs) == 1 and list(runs[0]["results"]) == [task]
        assert baselines[task] == runs[0]["results"][task]
    mmoe = family["architectures"]["mmoe"]
    assert len(mmoe["runs"]) == 1 and mmoe["flops_per_example"] > 0
    assert mmoe["params"] > A.architecture_cost(str(configs / "multimnist.py"), [])["params"]  # 2 expert MLPs + gates
    for run in mmoe["runs"]:
        expected = -50 * sum(run["results"][t]["accuracy"] / baselines[t]["accuracy"] - 1 for t in baselines)
        assert run["delta_m"] == pytest.approx(expected) and run["steps_per_sec"] > 0
    assert "no_such_model" in family["architectures"]["bad"]["error"]  # reported; mmoe still ran
    table = open(out + ".md").read()
    assert "| digit accuracy (%) ↑ | parity accuracy (%) ↑ | average | Δm% ↓ | params | FLOPs / example |" in table
    assert "| bad | failed: " in table
    row = next(line for line in table.splitlines() if line.startswith("| mmoe |"))
    assert f"| {mmoe['runs'][0]['delta_m']:.2f} |" in row and A.fmt_count(mmoe["params"]) in row

    again = A.main(args + ["--reuse"])["multimnist"]  # same runs kept (their timings too), nothing retrained
    assert again["single_task"] == dump["multimnist"]["single_task"]
    assert again["architectures"]["mmoe"]["runs"] == dump["multimnist"]["architectures"]["mmoe"]["runs"]
    report = A.main([a for a in args if not a.startswith("--archs")] + ["--archs=mmoe,hps", "--report-only"])
    assert report["multimnist"]["architectures"]["mmoe"]["runs"] == again["architectures"]["mmoe"]["runs"]
    assert report["multimnist"]["architectures"]["hps"] == {"error": A.NOT_RUN}  # never trained: marked, not run
    assert f"| hps | {A.NOT_RUN} |" in open(out + ".md").read()
    edited = configs / "multimnist_mmoe.py"  # an edited config file is retrained; the baselines are kept
    edited.write_text(edited.read_text() + "\n\n_unedited = get_config\n\n\ndef get_config(arg=None):\n"
                      "    config = _unedited(arg)\n    config.optim.lr = config.optim.lr / 2\n    return config\n")
    retrained = A.main(args + ["--reuse"])["multimnist"]
    assert retrained["single_task"] == dump["multimnist"]["single_task"]
    assert retrained["architectures"]["mmoe"]["runs"] != again["architectures"]["mmoe"]["runs"]


def test_baselines_are_seed_means_and_cells_show_mean_and_std():
    single = {"a": [{"results": {"a": {"accuracy": 0.5, "loss": 1.0}}}, {"results": {"a": {"accuracy": 0.7, "loss": 3.0}}}]}
    assert A.baseline_means(single) == {"a": {"accuracy": pytest.approx(0.6), "loss": pytest.approx(2.0)}}
    assert A.fmt_metric([0.5, 0.7], "accuracy") == "60.00 ± 10.00"
    assert A.fmt_metric([0.1, 0.3], "relative_l2") == "0.2 ± 0.1"
    assert A.fmt_count(95_780) == "95.78k" and A.fmt_count(3.3e6) == "3.30M"


@pytest.mark.slow  # real MultiMNIST configs at :smoke (minutes on 2 cores); the test above covers the script
def test_smoke_on_multimnist(data_dir, tmp_path):
    dump = A.main(["--smoke", "--archs=hps,mtan", "--seeds=0", f"--workdir={tmp_path / 'runs'}",
                   f"--out={tmp_path / 'table'}"])
    records = dump["multimnist"]["architectures"]
    assert all("error" not in r for r in records.values()) and records["mtan"]["params"] > records["hps"]["params"]


def test_flops_of_a_dense_layer_and_cost_analysis_forms():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return {"a": nn.Dense(10, use_bias=False)(x.reshape(x.shape[0], -1))}

    cost = model_cost(Net(), jax.ShapeDtypeStruct((784,), jnp.float32))
    assert cost["params"] == 7840
    assert cost["flops_per_example"] == pytest.approx(2 * 784 * 10, rel=0.01)  # a multiply-add = 2 FLOPs
    assert cost_flops({"flops": 3.0}) == 3.0 and cost_flops([{"flops": 1.0}, {"flops": 2.0}]) == 3.0
    with pytest.raises(ValueError, match="no 'flops'"):
        cost_flops([{}])


def test_a_workdir_of_another_config_is_not_resumed(configs_dir, tmp_path):
    """common.train_cached: the same workdir with other overrides trains afresh (equal to a run in
    a new workdir), not resumed from the other config's final checkpoint; the same overrides again
    read the saved results."""
    spec = os.path.join(configs_dir, "multimnist.py")
    shared = str(tmp_path / "shared")
    first = train_cached(spec, ["optim.lr=0.001"], shared)
    second = train_cached(spec, ["optim.lr=0.05"], shared)
    fresh = train_cached(spec, ["optim.lr=0.05"], str(tmp_path / "fresh"))
    assert second == fresh and second != first
    assert train_cached(spec, ["optim.lr=0.05"], shared) == second


def test_rebaseline_recomputes_delta_m_of_stored_runs_against_another_reference(configs_dir, tmp_path, monkeypatch):
    """--rebaseline: the stored runs' Δm% against another config's single-task runs (trained by
    ``single_task_baselines``, stubbed here with fixed accuracies), nothing else retrained."""
    import dataclasses

    from mtl_jax import tasks as T

    tasks = [T.classification("digit", 10), T.classification("parity", 2)]
    run = lambda d, p: {"results": {"digit": {"accuracy": d}, "parity": {"accuracy": p}}, "delta_m": 1.0}  # noqa: E731
    previous = {"multimnist": {"overrides": ["num_steps=6"], "seeds": [0, 1], "baseline_config": "multimnist.py",
                               "tasks": [dataclasses.asdict(t) for t in tasks], "single_task": {},
                               "architectures": {"mmoe": {"runs": [run(0.8, 0.9), run(0.6, 0.7)]}}}}
    trained = {}

    def fake_single(spec, tasks_, overrides, seeds, workdir):
        trained.update(spec=spec, overrides=overrides, seeds=seeds)
        return {"digit": [run(0.5, 0)] * 2, "parity": [run(0, 1.0)] * 2}

    monkeypatch.setattr(A, "single_task_baselines", fake_single)
    entries = A.select(A.discover_entries(configs_dir), "mmoe")
    out = str(tmp_path / "rebased")
    lines = A.rebaseline(previous, entries, "vit.py", str(tmp_path), out, "cmd")
    assert trained == {"spec": "vit.py", "overrides": ["num_steps=6"], "seeds": [0, 1]}
    # Δm% = -100/K sum_t (M_t - B_t)/B_t: seed 0 -(60 - 10)/2 = -25, seed 1 -(20 - 30)/2 = 5
    assert json.load(open(out + ".json"))["multimnist"]["architectures"]["mmoe"] == pytest.approx([-25.0, 5.0])
    assert any(line.startswith("| mmoe | 75.00 ± 10.00 | -10.00 ± 15.00 | 1.00 ± 0.00 |") for line in lines), lines
