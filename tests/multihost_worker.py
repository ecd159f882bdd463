"""One process of a multi-process CPU run (used by test_multihost.py, not collected by pytest).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT_PREFIX [overrides...]

Trains ``configs/digits_mlp.py`` (with the overrides) in WORKDIR and writes, per process,
``OUT_PREFIX.<PROCESS_ID>.npz``: every leaf of the final TrainState (params, optimiser state, rng,
metric sums, ...) as this process reads it, keyed by its '/'-joined path, and
``OUT_PREFIX.<PROCESS_ID>.json``: the final results this process computed. Every leaf of the state is
replicated over the mesh (digits_mlp has no sharding rule), so each process holds a full copy on each
of its devices; the worker exits with an error if two of its local copies differ in any bit.

``MULTIHOST_PAUSE_AT_STEP=N`` makes the process sleep (for an hour) after train step N, before that
step's checkpoint: the test kills it there.
"""

import json
import os
import sys
import time

process_id, num_processes, port, workdir, out = sys.argv[1:6]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
os.environ["JAX_NUM_PROCESSES"] = num_processes
os.environ["JAX_PROCESS_ID"] = process_id

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from mtl_jax.config import apply_overrides, load_config  # noqa: E402
from mtl_jax.train.sharding import key_path_str  # noqa: E402
from mtl_jax.train.trainer import train_and_evaluate  # noqa: E402

pause_at = int(os.environ.get("MULTIHOST_PAUSE_AT_STEP", "0"))


def on_step(step, state):
    if step == pause_at:
        print(f"process {process_id} paused after step {step}", flush=True)
        time.sleep(3600)


config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "digits_mlp.py"))
apply_overrides(config, ["progress_bar=False"] + sys.argv[6:])
summary = train_and_evaluate(config, workdir, on_step=on_step if pause_at else None)
assert jax.process_count() == int(num_processes), jax.process_count()
assert jax.process_index() == int(process_id), jax.process_index()

leaves = {}
for path, leaf in jax.tree_util.tree_flatten_with_path(summary["state"])[0]:
    name = key_path_str(path)
    assert leaf.sharding.is_fully_replicated, (name, leaf.sharding)
    copies = [np.asarray(shard.data) for shard in leaf.addressable_shards]
    assert len(copies) == 2, (name, len(copies))
    for copy in copies[1:]:
        assert copy.dtype == copies[0].dtype and copy.tobytes() == copies[0].tobytes(), \
            f"{name}: the local replicas of process {process_id} differ"
    leaves[name] = copies[0]
np.savez(f"{out}.{process_id}.npz", **leaves)
with open(f"{out}.{process_id}.json", "w") as f:
    json.dump(summary["results"], f)
print(f"process {process_id} done", flush=True)
