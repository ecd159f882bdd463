"""Tests run on 8 fake CPU devices so sharding code is exercised (set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A fresh tfds data dir shared by the session's tests (no network: datasets are generated)."""
    path = tmp_path_factory.mktemp("tfds")
    os.environ["MTL_JAX_DATA_DIR"] = str(path)
    return str(path)
