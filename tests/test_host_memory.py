"""``mtl_jax.host_memory``: freed large blocks stay mapped for the next step (no page faults)."""

import ast
import os
import subprocess
import sys

import pytest

from mtl_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees a 96 MiB array four times, in a thread other than the main one (as
# XLA:CPU's executor does: above glibc's 64 MiB per-thread heap), and prints the minor page faults
# of each round.
ROUNDS = """
import resource, threading
from mtl_jax.host_memory import reuse_freed_memory
print(reuse_freed_memory())
import numpy as np
faults = []
def rounds():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones(96 * 2**20 // 4, np.float32)
        del a
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=rounds)
t.start(); t.join()
print(faults)
"""


def fault_rounds(mode: str):
    env = {**os.environ, host_memory.ENV_VAR: mode}
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    return out[0] == "True", ast.literal_eval(out[1])


@pytest.mark.skipif(host_memory.glibc() is None, reason="the settings are glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = fault_rounds("reuse")
    assert applied
    # the first round maps the block; the next ones reuse it (a 4 KiB page each would be 24k faults)
    assert faults[0] > 40 and max(faults[1:]) <= 4, faults
    applied, faults = fault_rounds("system")
    assert not applied
    # glibc's default maps (and faults in) a fresh block every round
    assert min(faults[1:]) > 40, faults


def test_unknown_mode_is_an_error_naming_the_valid_ones(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match=r"MTL_JAX_HOST_MALLOC='jemalloc'; valid values: \['reuse', 'system'\]"):
        host_memory.reuse_freed_memory()


def test_glibc_tunables_match_the_mallopt_settings():
    assert host_memory.glibc_tunables(1 << 20) == ("glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1048576:"
                                                   "glibc.malloc.trim_threshold=1048576")
