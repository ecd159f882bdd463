"""Two JAX processes on this machine (jax.distributed + gloo CPU collectives, 2 devices each)
train the same run as one process on 4 devices: per-host input shards, global batches,
collective steps and a multi-process orbax checkpoint."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from mtl_jax.config import apply_overrides, load_config
from mtl_jax.train.trainer import train_and_evaluate

HERE = os.path.dirname(__file__)
OVERRIDES = ["num_steps=6", "checkpoint.every=3", "batch_size=64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    port, out = free_port(), str(tmp_path / "params.npz")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port),
                               str(tmp_path / "multi"), out] + OVERRIDES, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["3", "6"]

    config = load_config(os.path.join(HERE, "..", "configs", "digits_mlp.py"))
    apply_overrides(config, ["progress_bar=False", "mesh.data=4"] + OVERRIDES)
    single = jax.tree.leaves(jax.device_get(train_and_evaluate(config, str(tmp_path / "single"))["state"].params))
    multi = np.load(out)
    assert len(single) == len(multi.files) - 1
    for i, leaf in enumerate(single):
        np.testing.assert_allclose(multi[f"arr_{i}"], leaf, rtol=1e-4, atol=1e-6)
