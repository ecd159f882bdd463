"""Fault injection: kill -9 at random moments and mid-save, damaged checkpoints, concurrent starts, a
full disk, a run whose update or optimiser state goes non-finite. Each ends in one clear line or a
resume that loses nothing (bitwise the uninterrupted run)."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mtl_jax.config import apply_overrides, load_config
from mtl_jax.data import get_dataset
from mtl_jax.data.pipeline import to_global
from mtl_jax.errors import UsageError
from mtl_jax.train import checkpoint as ckpt
from mtl_jax.train import workdir as workdir_lib
from mtl_jax.train.step import guarded_leaves
from mtl_jax.train.trainer import NonFiniteError, build_experiment, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "digits_mlp.py")
DAMAGE_RUN = ["num_steps=10", "checkpoint.every=5", "checkpoint.keep=3", "log_every=5"]
KILL_RUN = ["num_steps=60", "checkpoint.every=3", "checkpoint.keep=2", "log_every=10", "batch_size=32"]


def config_of(overrides):
    config = load_config(CONFIG)
    return apply_overrides(config, ["progress_bar=False"] + list(overrides))


def host(tree):
    return jax.tree.leaves(jax.device_get(tree))


def assert_bitwise(a, b):
    a, b = host(a), host(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def saved_state(workdir, overrides):
    """(state, step) of the newest checkpoint in ``workdir`` (verified restore)."""
    exp = build_experiment(config_of(overrides))
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), keep=10)
    try:
        restored = ckpt.restore_latest(manager, exp.abstract_state)
    finally:
        manager.close()
    return restored.state, restored.step


def cli(workdir, overrides, **kwargs):
    """``mtl-jax train`` on digits_mlp as a child process (same XLA device count as the tests)."""
    args = [sys.executable, "-m", "mtl_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
            "--config.progress_bar=False"] + [f"--config.{o}" for o in overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def damage_reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("damage") / "reference")
    state = train_and_evaluate(config_of(DAMAGE_RUN), workdir)["state"]
    return workdir, jax.device_get((state.params, state.opt_state))


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory):
    state = train_and_evaluate(config_of(KILL_RUN), str(tmp_path_factory.mktemp("kill") / "reference"))["state"]
    return jax.device_get((state.params, state.opt_state))


def _largest_file(directory):
    files = [f for f in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


DAMAGE = {
    "emptied files": lambda d: [open(f, "w").close() for f in glob.glob(f"{d}/state/ocdbt.process_0/d/*")],
    "truncated file": lambda d: os.truncate(_largest_file(f"{d}/state"), os.path.getsize(_largest_file(f"{d}/state")) // 2),
    "garbage metadata": lambda d: open(f"{d}/state/_METADATA", "w").write("{garbage"),
    "removed item": lambda d: shutil.rmtree(f"{d}/state"),
    "flipped bytes": lambda d: _flip(_largest_file(f"{d}/state")),
    "truncated, no checksum yet": lambda d: (os.remove(f"{d}/{ckpt.CHECKSUMS}"),
                                             os.truncate(_largest_file(f"{d}/state"), 100)),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_and_resumes_bitwise(damage_reference, tmp_path, kind, capsys):
    reference_dir, reference = damage_reference
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    DAMAGE[kind](os.path.join(workdir, "checkpoints", "10"))
    summary = train_and_evaluate(config_of(DAMAGE_RUN), workdir)
    captured = capsys.readouterr()
    assert "checkpoint step 10" in captured.err and "skipped" in captured.err
    assert "resumed from the step-5 checkpoint" in captured.out
    assert os.listdir(os.path.join(workdir, ckpt.DAMAGED)) == ["10"]  # kept, not deleted
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["5", "10"]
    assert_bitwise(reference, (summary["state"].params, summary["state"].opt_state))


def test_no_restorable_checkpoint_is_one_error_naming_each_step(damage_reference, tmp_path):
    reference_dir, _ = damage_reference
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    for step in ("5", "10"):
        shutil.rmtree(os.path.join(workdir, "checkpoints", step, "state"))
    with pytest.raises(ckpt.CheckpointError, match=r"step 10: item\(s\) \['state'\] missing; step 5: item"):
        train_and_evaluate(config_of(DAMAGE_RUN), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "5"]  # nothing moved or deleted


def test_checksums_written_for_every_kept_step(damage_reference):
    reference_dir, _ = damage_reference
    for step in ("5", "10"):
        directory = os.path.join(reference_dir, "checkpoints", step)
        with open(os.path.join(directory, ckpt.CHECKSUMS)) as f:
            digests = json.load(f)
        assert digests == {item: ckpt.item_digest(os.path.join(directory, item)) for item in ckpt.ITEMS}
        assert ckpt.verify(directory) is None


def _kill_when(proc, ready, timeout=120.0):
    """SIGKILLs ``proc`` as soon as ``ready()`` holds (polled every millisecond); False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            return True
        time.sleep(0.001)
    proc.kill()
    proc.communicate(timeout=60)
    return False


def _saving(checkpoints):
    return lambda: os.path.isdir(checkpoints) and any("tmp" in name for name in os.listdir(checkpoints))


def test_kill_9_at_random_moments_and_mid_save_resumes_bitwise(kill_reference, tmp_path):
    workdir = str(tmp_path / "run")
    checkpoints = os.path.join(workdir, "checkpoints")
    rng = random.Random(0)
    kills = 0
    # Twice mid-save (a step directory still being written), then at random moments after start-up.
    moments = [_saving(checkpoints), _saving(checkpoints)] + [
        (lambda t0, delay: lambda: time.monotonic() - t0 > delay) for _ in range(2)]
    for i, moment in enumerate(moments):
        proc = cli(workdir, KILL_RUN)
        ready = moment(time.monotonic(), rng.uniform(3.0, 9.0)) if i >= 2 else moment
        kills += _kill_when(proc, ready)
    assert kills >= 2, "the runs ended before they could be killed"
    proc = cli(workdir, KILL_RUN)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    state, step = saved_state(workdir, KILL_RUN)
    assert step == 60
    assert_bitwise(kill_reference, (state.params, state.opt_state))
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["steps"] == 60 and results["warnings"] == []


def test_concurrent_start_is_refused_in_one_line(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    held = workdir_lib.lock(workdir)
    try:
        proc = cli(workdir, ["num_steps=2"])
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"workdir '{workdir}' is in use by another run (pid {os.getpid()}" in lines[0]
        with pytest.raises(UsageError, match="is in use by another run"):
            train_and_evaluate(config_of(["num_steps=2"]), workdir)
    finally:
        held.release()
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # the refused runs wrote nothing


def test_two_simultaneous_starts_one_runs_one_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    procs = [cli(workdir, ["num_steps=30", "checkpoint.every=10"]) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)][1]
    assert "is in use by another run" in refused
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["20", "30"]


def test_resume_with_another_config_is_refused_listing_the_keys(tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(config_of(["num_steps=4", "checkpoint.every=2"]), workdir)
    with pytest.raises(UsageError, match=r"another config \(optim.lr: 0.001 -> 0.01, seed: 0 -> 1\).*resume_mismatch"):
        train_and_evaluate(config_of(["num_steps=4", "checkpoint.every=2", "optim.lr=0.01", "seed=1"]), workdir)
    # Keys that do not change the trained model may differ.
    train_and_evaluate(config_of(["num_steps=4", "checkpoint.every=2", "log_every=1"]), workdir)
    allowed = config_of(["num_steps=6", "checkpoint.every=2", "resume_mismatch='allow'"])
    assert train_and_evaluate(allowed, workdir)["steps"] == 6
    stored = json.load(open(os.path.join(workdir, workdir_lib.CONFIG)))
    assert stored["num_steps"] == 6 and len(glob.glob(os.path.join(workdir, "config.*.json"))) == 1


def test_huge_update_and_overflowing_adam_state_are_not_applied():
    config = config_of(["optim.name='sgd'", "optim.lr=3e38"])
    exp = build_experiment(config)
    state = exp.init()
    keys = [exp.dataset.input_key] + [t.label_key for t in exp.dataset.tasks]
    batch = {k: np.stack([exp.dataset.splits["train"][i][k] for i in range(64)]) for k in keys}
    large = dict(batch, **{exp.dataset.input_key: batch[exp.dataset.input_key] * 1e4})  # gradients > 1
    before = jax.device_get(state.params)
    state, out = exp.train_step(state, to_global(large, exp.data_sharding))
    assert np.isfinite(np.asarray(out["losses"])).all() and not np.asarray(out["nonfinite_tasks"]).any()
    assert not bool(out["applied"]) and int(state.nonfinite_total) == 1  # finite gradients, Inf update
    paths = [p for (p, _), bad in zip(guarded_leaves(exp.abstract_state), np.asarray(out["nonfinite_state"])) if bad]
    assert paths and all(p.startswith("params/") for p in paths)
    assert_bitwise(before, state.params)

    exp = build_experiment(config_of([]))  # Adam: g^2 overflows the second moment, g itself finite
    state = exp.init()
    scaled = dict(batch, **{exp.dataset.input_key: batch[exp.dataset.input_key] * 1e12})
    before = jax.device_get((state.params, state.opt_state))
    state, out = exp.train_step(state, to_global(scaled, exp.data_sharding))
    paths = [p for (p, _), bad in zip(guarded_leaves(exp.abstract_state), np.asarray(out["nonfinite_state"])) if bad]
    assert not bool(out["applied"]) and any("/nu/" in p for p in paths), paths
    assert_bitwise(before, (state.params, state.opt_state))


def test_streak_keeps_the_last_good_checkpoints_and_names_the_leaves(tmp_path):
    # lr warms up to 1e30: the first steps are finite, then every update overflows the parameters.
    config = config_of(["num_steps=40", "checkpoint.every=1", "checkpoint.keep=2", "optim.name='sgd'",
                        "optim.lr=1e37", "optim.warmup_steps=1000000", "max_nonfinite_steps=5"])
    with pytest.raises(NonFiniteError, match=r"5 consecutive steps skipped .*non-finite .*params/"):
        train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    state, step = saved_state(str(tmp_path), ["num_steps=40", "optim.name='sgd'", "optim.lr=1e37",
                                               "optim.warmup_steps=1000000"])
    assert step == steps[-1] and int(state.nonfinite_streak) == 0  # saved before the streak began
    last_line = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(v is None or np.isfinite(v) for row in last_line for v in row.values() if not isinstance(v, str))


def test_nan_labels_warn_and_results_stay_valid_json(tmp_path, capsys):
    from mtl_jax.data import from_arrays

    base = get_dataset(config_of([]).data)
    arrays = {s: {k: np.array(v) for k, v in src.arrays.items()} for s, src in base.splits.items()}
    arrays["train"]["ink"][:8] = np.nan
    arrays["test"]["ink"][:1] = np.nan
    dataset = from_arrays("digits_nan", arrays, base.tasks)
    summary = train_and_evaluate(config_of(["num_steps=30", "log_every=10"]), str(tmp_path), dataset=dataset)
    err = capsys.readouterr().err
    assert "split 'train': 8 of" in err and "non-finite 'ink' label" in err
    assert "steps skipped" in err and "test ink/mse is nan" in err
    with open(tmp_path / "results.json") as f:
        results = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert results["results"]["ink"]["mse"] is None and results["nonfinite_total"] == summary["nonfinite_total"] > 0
    assert any("steps skipped" in w for w in results["warnings"])
    for line in open(tmp_path / "metrics.jsonl"):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a full-disk test needs root and mount(8) to make a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()})")


def test_full_disk_ends_in_one_line_and_resumes_bitwise(kill_reference, tmp_path):
    mount = str(tmp_path / "disk")
    _mount_tmpfs(mount, "1200k")
    try:
        workdir = os.path.join(mount, "run")
        proc = cli(workdir, KILL_RUN[:-2] + ["checkpoint.keep=5", "batch_size=32"])
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], err[-3000:]
        subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
        proc = cli(workdir, KILL_RUN[:-2] + ["checkpoint.keep=5", "batch_size=32"])
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        state, step = saved_state(workdir, KILL_RUN)
        assert step == 60
        assert_bitwise(kill_reference, (state.params, state.opt_state))
    finally:
        subprocess.run(["umount", "-l", mount], capture_output=True)
