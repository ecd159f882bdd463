"""Host (CPU) allocator settings that keep XLA:CPU's large per-step buffers mapped between steps.

XLA:CPU allocates an executable's temporaries and outputs with the C allocator, on every call.
glibc's ``malloc`` serves a request above its mmap threshold with a fresh ``mmap`` and unmaps it
on ``free``; and a request from a thread other than the main one, above its per-thread heap size
(64 MiB), is always mapped afresh. So every train step whose buffers are large (the per-task
Jacobian rows, [K, P] method state, the layer-wise Gramian's per-task cotangents) faults in and
zeroes those pages again, and on a virtual machine that hands freed guest memory back to the host,
each fault is a host round trip. ``reuse_freed_memory`` sets (``mallopt``, process-wide):

* ``M_ARENA_MAX = 1``: every thread allocates from the main heap, which grows without the 64 MiB
  cap of per-thread heaps;
* ``M_MMAP_THRESHOLD = M_TRIM_THRESHOLD = max_block`` (default 2 GiB - 1): blocks up to that size
  come from the heap, and freed ones stay in it for the next step.

The cost is that the process keeps its high-water mark of freed memory instead of returning it to
the system (peak use is unchanged). Measured by ``python -m benchmarks.method_step_time --host-malloc``.
It only affects threads that had not allocated yet, so call it before JAX creates its CPU client
(before the first computation); ``mtl-jax train`` calls it first thing. Set the environment
variable ``MTL_JAX_HOST_MALLOC=system`` to keep the C library's defaults. A no-op (returns False)
where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "MTL_JAX_HOST_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc <malloc.h>
MAX_BLOCK = 2**31 - 1  # mallopt takes an int


def glibc():
    """The process's C library when it is glibc (has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def glibc_tunables(max_block: int = MAX_BLOCK) -> str:
    """The same settings as ``reuse_freed_memory`` as a ``GLIBC_TUNABLES`` value, for a child process
    (e.g. a PyTorch peer in a benchmark) that cannot call ``mallopt`` itself."""
    return (f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={max_block}:"
            f"glibc.malloc.trim_threshold={max_block}")


def reuse_freed_memory(max_block: int = MAX_BLOCK) -> bool:
    """Applies the settings above; True when glibc accepted all three, False when skipped
    (``MTL_JAX_HOST_MALLOC=system``, or not glibc)."""
    mode = os.environ.get(ENV_VAR, "reuse")
    if mode not in ("reuse", "system"):
        raise ValueError(f"{ENV_VAR}={mode!r}; valid values: ['reuse', 'system']")
    libc = glibc() if mode == "reuse" else None
    if libc is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, max_block), (M_TRIM_THRESHOLD, max_block))
    return all(libc.mallopt(option, ctypes.c_int(value)) == 1 for option, value in settings)
