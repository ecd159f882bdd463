"""Two JAX processes on this machine (jax.distributed + gloo CPU collectives, 2 devices each)
train the same run as one process on 4 devices: per-host input shards, global batches,
collective steps, a multi-process orbax checkpoint, metrics written by process 0 only, and a
SIGKILL of both processes resumed from the last checkpoint.

What is bitwise and what is not: the two processes hold bit-identical train states (every leaf is
replicated: the same global array); a killed and resumed two-process run ends bit-identical to an
uninterrupted one. Two processes and one process do *not* agree bitwise: XLA:CPU's in-process
all-reduce sums the 4 devices' partial gradients in rank order, ((g0 + g1) + g2) + g3, while gloo's
ring all-reduce sums each quarter of the buffer starting at a different rank (chunk 0 as
((g3 + g2) + g1) + g0, chunk 1 as ((g0 + g3) + g2) + g1, ...). The states differ from the first
step on; after 12 steps the largest difference is 9.6e-7 of its leaf's largest magnitude
(params/shared/dense_1/bias: 1.1e-8 on values up to 0.011; the kernels 1.4e-7 of theirs, 3e-8
absolute), and the logged metrics and results differ by at most 3e-7 relative. The comparison
allows 1e-5 of each.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mtl_jax.config import apply_overrides, load_config
from mtl_jax.train.sharding import key_path_str
from mtl_jax.train.trainer import train_and_evaluate

HERE = os.path.dirname(__file__)
# 12 steps, a checkpoint every 3 (keep=2), a train-metrics line every 3.
OVERRIDES = ["num_steps=12", "checkpoint.every=3", "batch_size=64", "log_every=3"]
LOGGED = [(3, "train"), (6, "train"), (9, "train"), (12, "train"), (12, "test")]
TIMEOUT = 300  # seconds for any one wait on the worker processes
SCALE_RTOL = 1e-5  # two processes vs one: |a - b| <= SCALE_RTOL * max|b| per leaf (see the docstring)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, out, logs, extra_env=None) -> list:
    """Starts processes 0 and 1 of a two-process run (stdout and stderr to ``logs[i]``)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(extra_env or {})
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port), str(workdir),
                 str(out)] + OVERRIDES, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def read_logs(logs) -> str:
    return "\n".join(f"--- process {i} ---\n" + open(path).read()[-3000:] for i, path in enumerate(logs))


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def run_two_processes(workdir, out, logs) -> None:
    """Runs both processes to the end (TIMEOUT each); any failure reports both logs."""
    procs = launch(workdir, out, logs)
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two-process run did not finish in {TIMEOUT} s\n{read_logs(logs)}")
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [0, 0], read_logs(logs)


def load_state(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_bitwise(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}", strict=True)
        assert a[k].tobytes() == b[k].tobytes(), f"{what}: {k} differs in some bit (e.g. -0.0 vs 0.0)"


def assert_close_to_scale(a: dict, b: dict, what: str) -> None:
    """Floats: |a - b| <= SCALE_RTOL * max|b| per leaf; every other leaf (step, counts, rng) exactly."""
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        if np.issubdtype(b[k].dtype, np.floating):
            bound = SCALE_RTOL * float(np.max(np.abs(b[k]), initial=0.0))
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=bound, err_msg=f"{what}: {k}")
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


def assert_results_close(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for task in a:
        assert sorted(a[task]) == sorted(b[task]), (what, task)
        for metric, value in a[task].items():
            assert value == pytest.approx(b[task][metric], rel=SCALE_RTOL, abs=0), (what, task, metric)


def read_metrics(workdir) -> list:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]  # each line one JSON object: a torn or interleaved line fails


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted two-process run and the same run in this process on 4 devices."""
    tmp = tmp_path_factory.mktemp("multihost")
    logs = [tmp / "multi.0.log", tmp / "multi.1.log"]
    start = time.perf_counter()
    run_two_processes(tmp / "multi", tmp / "multi", logs)
    multi_seconds = time.perf_counter() - start

    config = load_config(os.path.join(HERE, "..", "configs", "digits_mlp.py"))
    apply_overrides(config, ["progress_bar=False", "mesh.data=4"] + OVERRIDES)
    summary = train_and_evaluate(config, str(tmp / "single"))
    single = {key_path_str(path): np.asarray(jax.device_get(leaf))
              for path, leaf in jax.tree_util.tree_flatten_with_path(summary["state"])[0]}
    return dict(tmp=tmp, workdir=tmp / "multi", logs=logs, seconds=multi_seconds,
                states=[load_state(tmp / f"multi.{i}.npz") for i in range(2)],
                results=[json.load(open(tmp / f"multi.{i}.json")) for i in range(2)],
                single=single, single_results=summary["results"], single_workdir=tmp / "single")


def test_both_processes_hold_the_same_state(runs):
    """Process 0 and process 1 read bit-identical final train states (params, optimiser moments,
    rng, metric sums, step) and compute the same final results."""
    state0, state1 = runs["states"]
    assert any(k.startswith("params/") for k in state0) and any(k.startswith("opt_state/") for k in state0)
    assert int(state0["step"]) == 12
    assert_bitwise(state0, state1, "process 0 vs process 1")
    assert runs["results"][0] == runs["results"][1]


def test_two_processes_match_one_process(runs):
    """2 processes x 2 devices vs 1 process x 4 devices, same global batches: equal up to the
    summation order of the gradient all-reduce (gloo ring vs XLA:CPU in rank order)."""
    assert sorted(d for d in os.listdir(runs["workdir"] / "checkpoints") if d.isdigit()) == ["12", "9"]  # keep=2
    for state in runs["states"]:
        assert_close_to_scale(state, runs["single"], "two processes vs one")
    assert_results_close(runs["results"][0], runs["single_results"], "results, two processes vs one")


def test_process_0_writes_the_metrics_once(runs):
    """metrics.jsonl (one line per logged step, no second writer) and results.json (valid JSON)
    exist in the shared workdir and agree with the one-process run's."""
    workdir = runs["workdir"]
    lines = read_metrics(workdir)
    assert [(line["step"], line["split"]) for line in lines] == LOGGED
    single_lines = read_metrics(runs["single_workdir"])
    assert [(line["step"], line["split"]) for line in single_lines] == LOGGED
    for line, single_line in zip(lines, single_lines):
        assert sorted(line) == sorted(single_line)
        for key, value in line.items():
            if key not in ("step", "split", "steps_per_sec"):
                assert value == pytest.approx(single_line[key], rel=SCALE_RTOL, abs=0), (line["step"], key)
    final = {k: v for k, v in lines[-1].items() if k not in ("step", "split")}
    assert final == {f"{task}/{m}": v for task, ms in runs["results"][0].items() for m, v in ms.items()}

    with open(workdir / "results.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 12
    assert summary["results"] == runs["results"][0]
    assert_results_close(summary["results"], runs["single_results"], "results.json, two processes vs one")
    assert (workdir / "results.md").exists()
    # one TensorBoard writer (its event file is named after the writing process)
    assert len(os.listdir(workdir / "tensorboard")) == 1, os.listdir(workdir / "tensorboard")


def test_kill_and_resume_two_processes(runs):
    """SIGKILL both processes once the step-6 checkpoint is committed, restart both (new port, same
    arguments): the run resumes from step 6 and ends bit-identical to the uninterrupted run, with
    the same metric lines."""
    tmp, workdir = runs["tmp"], runs["tmp"] / "killed"
    logs = [tmp / "killed.0.log", tmp / "killed.1.log"]
    # the processes sleep after step 7 (before its checkpoint), so the kill finds them mid-run
    procs = launch(workdir, tmp / "killed", logs, {"MULTIHOST_PAUSE_AT_STEP": "7"})
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (workdir / "checkpoints" / "6").is_dir():  # orbax renames the finished temporary dir to "6"
            assert all(p.poll() is None for p in procs), "a process exited before step 6\n" + read_logs(logs)
            assert time.monotonic() < deadline, f"no step-6 checkpoint after {TIMEOUT} s\n{read_logs(logs)}"
            time.sleep(0.05)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=30)
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, read_logs(logs)
    assert not (workdir / "results.json").exists()
    assert not any(os.path.exists(tmp / f"killed.{i}.npz") for i in range(2))

    start = time.perf_counter()
    logs = [tmp / "resumed.0.log", tmp / "resumed.1.log"]
    run_two_processes(workdir, tmp / "killed", logs)
    resume_seconds = time.perf_counter() - start
    log0 = open(logs[0]).read()
    assert "resumed from the step-6 checkpoint" in log0, read_logs(logs)

    states = [load_state(tmp / f"killed.{i}.npz") for i in range(2)]
    assert_bitwise(states[0], states[1], "resumed: process 0 vs process 1")
    assert_bitwise(states[0], runs["states"][0], "resumed vs uninterrupted")
    results = [json.load(open(tmp / f"killed.{i}.json")) for i in range(2)]
    assert results[0] == results[1] == runs["results"][0]

    # the killed run logged steps 3 and 6, the resumed one 9, 12 and the evaluation: no line twice
    lines, uninterrupted = read_metrics(workdir), read_metrics(runs["workdir"])
    assert [(line["step"], line["split"]) for line in lines] == LOGGED
    drop = lambda line: {k: v for k, v in line.items() if k != "steps_per_sec"}
    assert [drop(line) for line in lines] == [drop(line) for line in uninterrupted]
    with open(workdir / "results.json") as f:
        assert json.load(f)["results"] == runs["results"][0]
    assert sorted(d for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == ["12", "9"]
    print(f"uninterrupted two-process run {runs['seconds']:.1f} s, resumed run {resume_seconds:.1f} s")
