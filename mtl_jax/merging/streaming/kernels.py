"""Numpy kernels of the streaming merges, over chunks of ``CHUNK`` entries of flat leaves.

Weight averaging, task arithmetic, DARE with ``combine="ta"``, Consensus TA and the global TIES
output run as numpy kernels over zero-copy views of the inputs (safetensors files are mapped,
not read into buffers): every temporary is a (T, CHUNK) :class:`Workspace` allocated once per
worker thread and pass and reused, so a merge touches each input byte once per pass and
allocates no per-leaf arrays. The arithmetic is the in-memory code's, operation for operation
(task vectors ``f32(theta_t) - f32(theta_0)``, sums over tasks in task order, the same
comparisons), so the results equal the in-memory merges (tests/merging/test_streaming.py).

A kernel is ``kernel(ws, index, p0, fts, out, s, e)``: it fills ``out[s:e]`` of the flat output
leaf from chunk ``[s, e)`` of leaf ``index`` of the flat inputs, in ``ws``, its worker's
workspace (:func:`mtl_jax.merging.streaming.passes.chunk_pass` runs it).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.merging.background_import import BackgroundImport, background_import, numba_kernels_wanted
from mtl_jax.merging.input_checks import FiniteCheck
from mtl_jax.merging.ties import dare_keep

CHUNK = 1 << 16  # entries per chunk: a (T, CHUNK) fp32 workspace is T/4 MiB (cache-sized)
FUSED_MODULE = "mtl_jax.merging.streaming.fused"


def fused_kernels() -> Optional[Any]:
    """The fused kernels (:mod:`mtl_jax.merging.streaming.fused`, imported here on first use:
    it imports numba) when numba is installed, else None (the numpy kernels of this module; also
    with ``MTL_JAX_NUMPY_KERNELS=1``). Both give the same bits."""
    return importlib.import_module(FUSED_MODULE) if numba_kernels_wanted() else None


def fused_loader() -> Optional[BackgroundImport]:
    """The background import of the fused kernels (started on the first call), or None where
    :func:`fused_kernels` would be None."""
    return background_import(FUSED_MODULE)


def chunk_kernel(name: str, *args: Any) -> Callable:
    """``<name>(*args)`` of this module (a numpy kernel factory, e.g. "task_arithmetic_kernel"),
    run by the fused kernel of the same name (:mod:`mtl_jax.merging.streaming.fused`) from the
    first chunk after :func:`fused_loader` is done; the numpy kernel only without numba."""
    numpy_kernel = globals()[name](*args)
    loader = fused_loader()
    if loader is None:
        return numpy_kernel
    fused_kernel: list[Callable] = []

    def kernel(ws, index, p0, fts, out, s, e):
        if not fused_kernel:
            module = loader.ready()
            if module is None:
                return numpy_kernel(ws, index, p0, fts, out, s, e)
            fused_kernel.append(getattr(module, name)(*args))
        return fused_kernel[0](ws, index, p0, fts, out, s, e)

    return kernel


class Workspace:
    """Reusable chunk buffers of one pass: ``tau`` / ``work`` fp32 (T, CHUNK), ``mask`` /
    ``mask2`` bool (T, CHUNK), ``row`` / ``row2`` fp32 (CHUNK,), ``flags`` bool (3, CHUNK),
    ``count`` (CHUNK,) uint8 (int32 for T >= 255), ``inputs`` fp32 (T + 1, CHUNK) for non-fp32 inputs.
    ``finite``: refuse NaN / inf inputs (:meth:`check`; ``leaf`` is the index of the leaf being
    worked on)."""

    def __init__(self, num_tasks: int, finite: Optional[FiniteCheck] = None):
        self.finite, self.leaf = finite, 0
        self.tau = np.empty((num_tasks, CHUNK), np.float32)
        self.work = np.empty((num_tasks, CHUNK), np.float32)
        self.mask = np.empty((num_tasks, CHUNK), np.bool_)
        self.mask2 = np.empty((num_tasks, CHUNK), np.bool_)
        self.row = np.empty((CHUNK,), np.float32)
        self.row2 = np.empty((CHUNK,), np.float32)
        self.flags = np.empty((3, CHUNK), np.bool_)
        self.count = np.empty((CHUNK,), np.uint8 if num_tasks < 255 else np.int32)
        self.inputs = np.empty((num_tasks + 1, CHUNK), np.float32)

    def f32(self, x: np.ndarray, i: int, s: int, e: int) -> np.ndarray:
        """Chunk ``[s, e)`` of flat input ``x`` as fp32 (a view if it is fp32; else cast into row
        ``i`` of ``inputs``)."""
        if x.dtype == np.float32:
            return x[s:e]
        out = self.inputs[i, : e - s]
        np.copyto(out, x[s:e], casting="unsafe")
        return out

    def task_vectors(self, p0: np.ndarray, fts: Sequence[np.ndarray], s: int, e: int,
                     check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(theta_0 chunk, tau chunk (T, n))`` with ``tau_t = f32(theta_t) - f32(theta_0)``;
        ``check``: :meth:`check` on tau (non-finite wherever theta_t or theta_0 is). Kernels with a
        cheaper witness (an (n,) result non-finite wherever tau is) pass False and check that."""
        p = self.f32(p0, 0, s, e)
        tau = self.tau[:, : e - s]
        for t, f in enumerate(fts):
            np.subtract(self.f32(f, t + 1, s, e), p, out=tau[t])
        if check:
            self.check(p0, fts, s, e, tau)
        return p, tau

    def check(self, p0: np.ndarray, fts: Sequence[np.ndarray], s: int, e: int, x: Optional[np.ndarray] = None) -> None:
        """With ``finite`` set, refuse NaN / inf in chunk ``[s, e)`` of the inputs: ``x`` is a chunk
        computed from them, in cache, non-finite wherever they are; only if its max or min is
        NaN / inf (2.5x faster than a sum each; or ``x`` is None) are the inputs looked at
        (NonFiniteInputError names file and tensor)."""
        if self.finite is not None and (x is None or not np.isfinite(np.max(x)) or not np.isfinite(np.min(x))):
            self.finite.chunk(self.leaf, p0, fts, s, e)


def spans(size: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` chunks of ``range(size)``."""
    for s in range(0, size, CHUNK):
        yield s, min(s + CHUNK, size)


def masked(x: np.ndarray, mask: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``where(mask, x, 0)`` for fp32 ``x`` into ``out``: the bit patterns times the 0/1 mask
    (exact, +0.0 where dropped; several times faster than a masked ``copyto``)."""
    np.multiply(x.view(np.int32), mask, out=out.view(np.int32))
    return out


def sign_into(x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``sign(x)`` in {-1, 0, 1} for fp32 ``x`` (NaN -> 0) into ``out``; scratch bool (2, n)."""
    np.greater(x, 0, out=scratch[0])
    np.less(x, 0, out=scratch[1])
    return np.subtract(scratch[0], scratch[1], out=out, dtype=np.float32)


def store(out: np.ndarray, s: int, e: int, value: np.ndarray) -> None:
    """``out[s:e] = value`` (cast to ``out``'s dtype); nothing to do where ``value`` was computed
    in place (:func:`fp32_slot`)."""
    target = out[s:e]
    if value.dtype != target.dtype or value.__array_interface__["data"][0] != target.__array_interface__["data"][0]:
        np.copyto(target, value, casting="unsafe")


def fp32_slot(ws: Workspace, out: np.ndarray, s: int, e: int) -> np.ndarray:
    """Where to compute an fp32 result chunk: the output itself if it is fp32."""
    return out[s:e] if out.dtype == np.float32 else ws.row2[: e - s]


def task_arithmetic_kernel(lam: np.ndarray) -> Callable:
    """``theta_0 + sum_t lam_t tau_t`` per chunk (:func:`mtl_jax.merging.arithmetic.task_arithmetic`);
    lam: fp32 (T,)."""

    def kernel(ws, index, p0, fts, out, s, e):
        p = ws.f32(p0, 0, s, e)
        row = ws.tau[0, : e - s]  # one task vector at a time: the chunk's buffers stay in the L2 cache
        acc = fp32_slot(ws, out, s, e)
        for t, f in enumerate(fts):
            np.subtract(ws.f32(f, t + 1, s, e), p, out=row)
            if t == 0:
                np.multiply(row, lam[0], out=acc)
            else:
                row *= lam[t]
                acc += row
        acc += p
        ws.check(p0, fts, s, e, acc)  # lam_t * (NaN or inf) is NaN or inf for any lam_t
        store(out, s, e, acc)

    return kernel


def weight_average_kernel(w: np.ndarray) -> Callable:
    """``sum_t w_t f32(theta_t)`` per chunk (:func:`mtl_jax.merging.arithmetic.weight_average`);
    w: normalised fp32 (T,)."""

    def kernel(ws, index, p0, fts, out, s, e):
        acc = fp32_slot(ws, out, s, e)
        np.multiply(ws.f32(fts[0], 1, s, e), w[0], out=acc)
        for t in range(1, len(fts)):
            tmp = ws.tau[0, : e - s]
            np.multiply(ws.f32(fts[t], t + 1, s, e), w[t], out=tmp)
            acc += tmp
        if ws.finite is not None:  # the average is non-finite wherever a theta_t is; theta_0 is not used
            ws.check(p0, fts, s, e, acc)
            ws.check(p0, fts, s, e, ws.f32(p0, 0, s, e))
        store(out, s, e, acc)

    return kernel


@functools.partial(jax.jit, static_argnames=("num_tasks", "p"))
def _dare_keep_chunk(key: jax.Array, index: jax.Array, start: jax.Array, num_tasks: int, p: float) -> jax.Array:
    """:func:`mtl_jax.merging.ties.dare_keep` of entries ``[start, start + CHUNK)``: bool (T, CHUNK)."""
    return dare_keep(key, index, num_tasks, start + jnp.arange(CHUNK, dtype=jnp.uint32), p)


def dare_ta_kernel(key: jax.Array, p: float, lam: np.ndarray) -> Callable:
    """:func:`mtl_jax.merging.ties.dare_merging` with ``combine="ta"`` per chunk: the keep mask of
    each chunk is drawn by the same counter-based generator as the in-memory DARE (one fused
    jitted call for all T tasks), survivors scaled by ``1 / (1 - p)``, then task arithmetic."""
    scale = np.float32(1.0 - p)

    def kernel(ws, index, p0, fts, out, s, e):
        n = e - s
        keep = np.asarray(_dare_keep_chunk(key, np.uint32(index), np.uint32(s), len(fts), p))[:, :n]
        p_ = ws.f32(p0, 0, s, e)
        row, dropped = ws.tau[0, :n], ws.work[0, :n]  # one task at a time: the buffers stay in cache
        acc = fp32_slot(ws, out, s, e)
        for t, f in enumerate(fts):
            np.subtract(ws.f32(f, t + 1, s, e), p_, out=row)
            ws.check(p0, fts, s, e, row)
            row /= scale
            row *= lam[t]
            masked(row, keep[t], dropped)
            if t == 0:
                np.add(dropped, 0, out=acc)  # 0 + ...: np.sum over tasks starts from its identity
            else:
                acc += dropped
        acc += p_
        store(out, s, e, acc)

    return kernel


def consensus_ta_kernel(k: int, tall_lambda: np.ndarray, lam: float) -> Callable:
    """Consensus TA per chunk (:func:`mtl_jax.merging.masks.consensus_merging`, base "ta"): TALL
    masks ``|tau_t| > lam_t |tau_MTL - tau_t|`` around ``tau_MTL = sum_t tau_t``, kept where at
    least ``k`` masks agree; tall_lambda: fp32 (T,)."""

    def kernel(ws, index, p0, fts, out, s, e):
        n = e - s
        p, tau = ws.task_vectors(p0, fts, s, e, check=False)
        mtl, dist, agree, count = ws.row[:n], ws.work[:, :n], ws.mask[:, :n], ws.count[:n]
        np.sum(tau, axis=0, out=mtl)
        ws.check(p0, fts, s, e, mtl)  # a sum over tasks is non-finite wherever a tau_t is
        np.subtract(mtl[None], tau, out=dist)
        np.abs(dist, out=dist)
        dist *= tall_lambda[:, None]
        np.abs(tau, out=tau)
        np.greater(tau, dist, out=agree)
        np.add.reduce(agree.view(np.uint8), axis=0, dtype=count.dtype, out=count)
        merged = masked(mtl, count >= k, fp32_slot(ws, out, s, e))
        merged *= np.float32(lam)
        merged += p
        store(out, s, e, merged)

    return kernel


def disjoint_mean_np(trimmed: np.ndarray, sign: np.ndarray, scratch: np.ndarray, agree: np.ndarray,
                      out: np.ndarray, count: np.ndarray) -> np.ndarray:
    """:func:`mtl_jax.merging.ties.disjoint_mean` of one chunk into ``out`` (n,): trimmed (T, n),
    sign (n,) in {-1, 0, 1}; ``scratch`` fp32 / ``agree`` bool (T, n), ``count`` integer (n,) (uint8
    when T < 255).

    ``A = {t : trimmed_t * s > 0}`` as in the in-memory code; the sum of the agreeing entries is
    computed as ``s * sum_{t in A} trimmed_t * s``: the same magnitudes added in the same task
    order (float addition is sign-symmetric), so the same value bit for bit.
    """
    np.multiply(trimmed, sign[None], out=scratch)
    np.greater(scratch, 0, out=agree)
    masked(scratch, agree, scratch)
    np.sum(scratch, axis=0, out=out)
    out *= sign
    np.add.reduce(agree.view(np.uint8), axis=0, dtype=count.dtype, out=count)
    np.maximum(count, 1, out=count)
    out /= count.astype(np.float32)
    return out
