"""One process of a multi-process CPU run (used by test_multihost.py, not collected by pytest).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.npz [overrides...]
"""

import os
import sys

process_id, num_processes, port, workdir, out = sys.argv[1:6]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
os.environ["JAX_NUM_PROCESSES"] = num_processes
os.environ["JAX_PROCESS_ID"] = process_id
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from mtl_jax.config import apply_overrides, load_config  # noqa: E402
from mtl_jax.train.trainer import train_and_evaluate  # noqa: E402

config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "digits_mlp.py"))
apply_overrides(config, ["progress_bar=False"] + sys.argv[6:])
summary = train_and_evaluate(config, workdir)
assert jax.process_count() == int(num_processes), jax.process_count()
leaves = jax.tree.leaves(jax.device_get(summary["state"].params))
if jax.process_index() == 0:
    np.savez(out, *leaves, accuracy=summary["results"]["digit"]["accuracy"])
