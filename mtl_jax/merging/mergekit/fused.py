"""Fused (numba) output passes of the MergeKit methods: ``linear`` and the task arithmetic family
without sparsification or sign consensus (``task_arithmetic``; ``dare_linear`` / ``breadcrumbs``
at density 1).

The numpy code of :mod:`mtl_jax.merging.mergekit.methods` emulates MergeKit's bfloat16 torch ops
with ~47 passes over a block per output entry (task arithmetic: every elementwise result rounded
to bfloat16, :meth:`~mtl_jax.merging.mergekit.methods.Precision.round_`); these kernels do the
same float32 operations in the same order in one pass, with the rounding in registers: the
float32 bit pattern (a bitcast, :func:`_bits`) plus ``0x7FFF`` plus its bit 16, low half cleared
(round to nearest even; equal to the cast for every non-NaN float32). numba without ``fastmath``
neither reassociates nor contracts ``a * b + c`` into an FMA, so the results are the numpy path's
bits (tests/merging/test_mergekit_fused.py).

NaN: the kernels leave a NaN unrounded (it stays NaN through every later operation) and report
the blocks whose results hold one; the caller recomputes those blocks with numpy, which gives
the cast's NaN (sign and payload as numpy's operations make them).

Inputs are flat arrays: bfloat16 as their uint16 bit patterns (widened by a 16-bit shift, exact),
float32 as is; the non-base inputs one tuple of one dtype. Outputs: bfloat16 (uint16 bit
patterns, the high halves of rounded values) or float32. Blocks are ``BLOCK`` entries (a few
float32 rows stay in the L1 cache); ``nan_blocks[i]`` is set for block ``i`` of the call.

Compiled on first use per signature (``cache=True``: later processes load the machine code from
``__pycache__``, ~50 ms a signature) and run without the GIL (``nogil=True``), so the worker threads of
:func:`mtl_jax.merging.mergekit.methods.run_chunks` run them in parallel. This module imports
numba; :func:`mtl_jax.merging.mergekit.methods.fused_kernels` imports it in a background thread.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

BLOCK = 2048  # entries per block of a kernel (a float32 row is 8 KiB)

_jit = numba.njit(cache=True, nogil=True)
_inline = numba.njit(cache=True, nogil=True)  # small: LLVM inlines them

_U16 = np.uint32(16)
_ONE = np.uint32(1)
_HALF = np.uint32(0x7FFF)
_HIGH = np.uint32(0xFFFF0000)
_ZERO = np.float32(0.0)


@intrinsic
def _bits(typingctx, x):
    """The uint32 bit pattern of a float32 (a bitcast, no memory)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _float(typingctx, u):
    """The float32 of a uint32 bit pattern (a bitcast)."""
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@_inline
def round_bf16(v):
    """float32 -> bfloat16 -> float32, round to nearest even on the bit pattern; NaN unchanged."""
    u = _bits(v)
    r = _float(np.uint32((u + _HALF + ((u >> _U16) & _ONE)) & _HIGH))
    return v if v != v else r


@_inline
def _round(v, half):
    return round_bf16(v) if half else v


def _load(x, k, half):
    """Entry ``k`` of a flat input as float32 in the working precision (compiled by :func:`_load_impl`)."""
    raise TypeError("_load runs only inside the numba-compiled kernels (numba.extending.overload)")


@overload(_load)
def _load_impl(x, k, half):
    if isinstance(x, types.Array) and x.dtype == types.uint16:
        def widen(x, k, half):  # a bfloat16 value is exact in bfloat16 and float32 work
            return _float(np.uint32(np.uint32(x[k]) << _U16))

        return widen

    def load(x, k, half):  # float32: rounded to bfloat16 work (MergeKit casts inputs on load)
        return _round(x[k], half)

    return load


def _store(out, k, v):
    """``out[k] = v`` (compiled by :func:`_store_impl`); bfloat16 bit patterns: ``v`` rounded to
    bfloat16 (a no-op on a bfloat16 value), its high half."""
    raise TypeError("_store runs only inside the numba-compiled kernels (numba.extending.overload)")


@overload(_store)
def _store_impl(out, k, v):
    if isinstance(out, types.Array) and out.dtype == types.uint16:
        def high(out, k, v):
            out[k] = np.uint16(_bits(round_bf16(v)) >> _U16)

        return high

    def plain(out, k, v):
        out[k] = v

    return plain


@_jit
def task_arithmetic_chunk(base, xs, w, wsum, lam, normalize, scale, half, out, nan_blocks):
    """MergeKit's generalized task arithmetic without sparsification or consensus, entries
    ``[0, len(out))``: with ``r`` the working-dtype rounding (``half``),
    ``d_i = r(r(x_i - b) w_i)``, ``m = r(0 + d_0 + d_1 + ...)``, ``m = r(m / wsum)`` if
    ``normalize``, ``m = r(m lam)`` if ``scale``, ``out = r(b + m)``. ``base`` / ``xs[i]``:
    flat inputs of the same length as ``out``; ``w``: float32 (len(xs),), the weights as the
    working dtype rounds them; ``wsum``, ``lam``: float32."""
    n = out.shape[0]
    acc = np.empty(BLOCK, np.float32)
    bb = np.empty(BLOCK, np.float32)
    for blk in range(nan_blocks.shape[0]):
        s = blk * BLOCK
        m = min(BLOCK, n - s)
        b = base[s : s + m]  # block slices: indices from 0 (no negative-index checks in the loops)
        for j in range(m):
            bb[j] = _load(b, j, half)
        for t in range(len(xs)):
            x = xs[t][s : s + m]
            wt = w[t]
            if t == 0:
                for j in range(m):
                    d = _round(_round(_load(x, j, half) - bb[j], half) * wt, half)
                    acc[j] = d + _ZERO
            else:
                for j in range(m):
                    d = _round(_round(_load(x, j, half) - bb[j], half) * wt, half)
                    acc[j] = acc[j] + d
        for j in range(m):  # a branch inside these loops would keep them from being vectorised
            acc[j] = _round(acc[j], half)
        if normalize:
            for j in range(m):
                acc[j] = _round(acc[j] / wsum, half)
        if scale:
            for j in range(m):
                acc[j] = _round(acc[j] * lam, half)
        o = out[s : s + m]
        nan = False
        for j in range(m):
            v = _round(bb[j] + acc[j], half)
            nan |= v != v
            _store(o, j, v)
        nan_blocks[blk] = nan


@_jit
def linear_chunk(xs, w, denom, normalize, half, out, nan_blocks):
    """MergeKit's ``linear``, entries ``[0, len(out))``: ``acc = 0 + x_0 w_0``, ``acc += x_i w_i``
    (each product rounded to float32 first), ``acc /= denom`` if ``normalize``, one rounding to
    the working dtype (``half``). ``w``: float32 (len(xs),); ``denom``: float32."""
    n = out.shape[0]
    acc = np.empty(BLOCK, np.float32)
    for blk in range(nan_blocks.shape[0]):
        s = blk * BLOCK
        m = min(BLOCK, n - s)
        for t in range(len(xs)):
            x = xs[t][s : s + m]  # block slices: indices from 0 (no negative-index checks in the loops)
            wt = w[t]
            if t == 0:
                for j in range(m):
                    acc[j] = _load(x, j, half) * wt + _ZERO
            else:
                for j in range(m):
                    acc[j] = acc[j] + _load(x, j, half) * wt
        if normalize:  # outside the loops: a branch inside would keep them from being vectorised
            for j in range(m):
                acc[j] = acc[j] / denom
        o = out[s : s + m]
        nan = False
        for j in range(m):
            v = _round(acc[j], half)
            nan |= v != v
            _store(o, j, v)
        nan_blocks[blk] = nan


def num_blocks(n: int) -> int:
    return -(-n // BLOCK)


__all__ = ["BLOCK", "linear_chunk", "num_blocks", "round_bf16", "task_arithmetic_chunk"]
