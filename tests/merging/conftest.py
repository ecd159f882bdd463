"""Shared fixtures for the merging tests: 8 fake CPU devices and small random param trees."""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from .helpers import random_tree  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def models(rng):
    """(pretrained, [3 fine-tuned]) with deltas of scale 0.1."""
    p0 = random_tree(rng)
    fts = [jax.tree_util.tree_map(lambda a, d: a + d, p0, random_tree(rng, scale=0.1)) for _ in range(3)]
    return p0, fts
