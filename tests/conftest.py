"""Tests run on 8 fake CPU devices so sharding code is exercised (set before jax is imported).

Compiled executables go to a persistent compilation cache in a fresh temporary folder per session:
many tests build the same experiment (same HLO) and then load it instead of compiling it again
(measured: a fifth less CPU on tests/test_train.py + tests/methods/test_step_feeds.py); nothing
carries over between sessions.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtl_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A fresh tfds data dir shared by the session's tests (no network: datasets are generated)."""
    path = tmp_path_factory.mktemp("tfds")
    os.environ["MTL_JAX_DATA_DIR"] = str(path)
    return str(path)
