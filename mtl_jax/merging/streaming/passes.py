"""Passes over the inputs of a streaming merge, leaf by leaf, and the worker pool that runs a
numpy kernel over every chunk of every leaf: a leaf's chunks are split over ``threads`` workers
(numpy releases the GIL in its loops) and each output leaf is written by a writer thread while
the next leaf is computed."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
from tqdm.auto import tqdm

from mtl_jax.merging.streaming.kernels import Workspace, spans
from mtl_jax.merging.streaming.planning import Stream


# Per-pass timings, recorded only while this is a list (benchmarks/merge_throughput.py --profile):
# {"pass", "leaves", "wall_s", "kernel_s" (summed over workers), "write_wait_s", and for passes with an
# output "last_write_s" (the part of write_wait_s spent after the last leaf was computed)}.
PASS_LOG: Optional[list] = None


def _record(desc: str, leaves: int, start: float, kernel_s: float = 0.0, write_wait_s: float = 0.0) -> None:
    if PASS_LOG is not None:
        PASS_LOG.append({"pass": desc, "leaves": leaves, "wall_s": time.perf_counter() - start, "kernel_s": kernel_s,
                         "write_wait_s": write_wait_s})


def _flat_inputs(reader: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Flat (C-order) arrays of ``names``: zero-copy views where the reader has them."""
    if hasattr(reader, "view"):
        return {n: reader.view(n).reshape(-1) for n in names}
    return {n: np.asarray(x).reshape(-1) for n, x in reader.read_group(names).items()}


def leaf_pass(stream: Stream, desc: str) -> Iterator[tuple[int, str, np.ndarray, list[np.ndarray]]]:
    """One pass over the inputs leaf by leaf: ``(leaf index, name, flat theta_0, [flat theta_t])``.
    Views are released (and the next group prefetched) when the consumer moves on."""
    stream.passes += 1
    readers = [stream.pretrained] + list(stream.finetuned)
    bar = tqdm(total=len(stream.names), desc=desc, unit="leaf", disable=not stream.progress, leave=False)
    index, start = 0, time.perf_counter()
    try:
        for g, group in enumerate(stream.groups):
            if g + 1 < len(stream.groups):
                for r in readers:
                    for n in stream.groups[g + 1] if hasattr(r, "prefetch") else ():
                        r.prefetch(n)
            arrays = [_flat_inputs(r, group) for r in readers]
            for name in group:
                yield index, name, arrays[0][name], [a[name] for a in arrays[1:]]
                index += 1
                bar.update(1)
            del arrays
            for r in readers:
                for n in group if hasattr(r, "release") else ():
                    r.release(n)
    finally:
        bar.close()
        _record(desc, index, start)


def _max_leaf_bytes(stream: Stream) -> int:
    return max(stream.pretrained.specs[n].nbytes for n in stream.names)


def default_threads() -> int:
    """Worker threads of the numpy kernels: the CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def chunk_pass(stream: Stream, desc: str, make_kernel: Callable[[], Callable], writer: Any = None) -> list:
    """One pass of a numpy kernel over every ``CHUNK`` of every leaf.

    ``make_kernel()`` is called once per worker thread; each kernel is called as
    ``kernel(ws, index, p0, fts, out, s, e)`` for chunk ``[s, e)`` of leaf ``index`` (flat inputs,
    ``ws`` that worker's own :class:`Workspace`) and fills ``out[s:e]`` of the flat output leaf
    (``None`` without a ``writer``). A leaf's chunks are split into ``stream.threads`` contiguous
    runs done in parallel (numpy releases the GIL in its loops); the leaf is written when all
    are done, by a writer thread (in order) while the next leaf is computed into a second output
    buffer. Returns the kernels, so that callers can combine what each one accumulated.
    """
    threads = max(1, stream.threads)
    kernels = [make_kernel() for _ in range(threads)]
    spaces = [Workspace(stream.num_tasks, stream.finite) for _ in range(threads)]
    # two output arenas: leaf i + 1 is computed while leaf i is written by the writer thread
    arenas = [np.empty(max(_max_leaf_bytes(stream), 1) if writer is not None else 0, np.uint8) for _ in range(2)]
    pending: list[Optional[concurrent.futures.Future]] = [None, None]

    kernel_s, write_wait_s = [0.0] * threads, 0.0
    log_start = len(PASS_LOG) if PASS_LOG is not None else 0

    def run(i, index, p0, fts, out, chunks):
        spaces[i].leaf = index
        t = time.perf_counter()
        for s, e in chunks:
            kernels[i](spaces[i], index, p0, fts, out, s, e)
        kernel_s[i] += time.perf_counter() - t

    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(threads)) if threads > 1 else None
        io = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1)) if writer is not None else None
        for index, name, p0, fts in leaf_pass(stream, desc):
            spec = stream.pretrained.specs[name]
            out = None
            if writer is not None:
                slot = index % 2
                if pending[slot] is not None:
                    t = time.perf_counter()
                    pending[slot].result()
                    write_wait_s += time.perf_counter() - t
                out = arenas[slot][: spec.nbytes].view(spec.dtype)
            chunks = list(spans(p0.size))
            runs = [chunks[i * len(chunks) // threads : (i + 1) * len(chunks) // threads] for i in range(threads)]
            if pool is None or len(chunks) < 2:
                run(0, index, p0, fts, out, chunks)
            else:
                for f in [pool.submit(run, i, index, p0, fts, out, c) for i, c in enumerate(runs) if c]:
                    f.result()
            if io is not None:
                pending[slot] = io.submit(writer.write, name, out.reshape(spec.shape))
        t = time.perf_counter()
        for f in pending:
            if f is not None:
                f.result()
        last_write_s = time.perf_counter() - t  # after the leaf pass's own record
    if PASS_LOG is not None and len(PASS_LOG) > log_start:  # the leaf_pass record of this pass
        PASS_LOG[-1].update(kernel_s=sum(kernel_s), write_wait_s=write_wait_s + last_write_s, last_write_s=last_write_s)
        PASS_LOG[-1]["wall_s"] += last_write_s
    return kernels
