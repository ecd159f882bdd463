"""Fused (numba) kernels of the streaming merges: one pass per chunk, each input entry read once.

The numpy kernels of :mod:`mtl_jax.merging.streaming.kernels` make several passes over
cache-sized buffers per chunk (task arithmetic 3 per task entry, DARE 7, Consensus ~9, TIES
~16); these make one, with the arithmetic of an entry in registers. They compute the same
float32 operations in the same order as the numpy kernels (task vectors ``f32(theta_t) -
f32(theta_0)``; sums over tasks in task order starting from +0.0, as ``np.sum(axis=0)`` does;
dropped entries +0.0, as :func:`~mtl_jax.merging.streaming.kernels.masked`), so the results are
the same bits: numba without ``fastmath`` neither reassociates nor contracts ``a * b + c`` into
an FMA (tests/merging/test_streaming_fused.py compares the bits).

A chunk is worked on in blocks of ``BLOCK`` entries (the block's task-vector rows stay in the L1
/ L2 cache); inputs are the whole flat leaves (zero-copy views of the mapped files) and a start
``s``: fp32 as is, bf16 as its uint16 bit pattern (widened exactly by a 16-bit shift), other
dtypes (fp16, mixed dtypes) cast to fp32 rows of the :class:`Workspace` first. A kernel returns
whether it may have met a non-finite task vector (a non-finite block sum or result); the Python
side then runs the exact input check (:meth:`Workspace.check`), which names file and tensor.

Global TIES (:mod:`mtl_jax.merging.streaming.ties_global`) has three more: the output kernel
also copies out the positions it keeps aside (theta_0, tau and the bracket entries, while the
block is in the cache), their outputs once the thresholds are exact
(:func:`ties_patch_values`), and the two order statistics of the threshold sample
(:func:`order_statistics`, a radix select instead of ``np.partition``).

The kernels are compiled on first use (``cache=True``: later processes load them from
``__pycache__``) and release the GIL (``nogil=True``): the worker threads of
:func:`mtl_jax.merging.streaming.passes.chunk_pass` run them in parallel. This module imports
numba; :func:`mtl_jax.merging.streaming.kernels.fused_kernels` imports it only when a merge
runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import jax
import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from mtl_jax.merging.streaming.kernels import CHUNK, Workspace, fp32_slot, store
from mtl_jax.merging.ties import dare_streams, drop_threshold

BLOCK = 1024  # entries per block: a (T, BLOCK) fp32 scratch is T * 4 KiB
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_INF = np.float32(np.inf)
_INF_BITS = np.int32(0x7F800000)  # bit pattern of +inf: |x| bits at least this are inf or NaN
_BF16 = np.dtype(ml_dtypes.bfloat16)

_jit = numba.njit(cache=True, nogil=True)


# ------------------------------------------------------------------------- loading a block


def _block(x, s, n, buf):
    """Entries ``[s, s + n)`` of the flat input ``x`` as fp32 (n,): a view of ``x`` (fp32) or,
    for the uint16 bit patterns of bf16, widened into ``buf`` (compiled by :func:`_block_impl`)."""
    raise TypeError("_block runs only inside the numba-compiled kernels (numba.extending.overload)")


@overload(_block)
def _block_impl(x, s, n, buf):
    if isinstance(x, types.Array) and x.dtype == types.uint16:

        def widen(x, s, n, buf):
            bits = buf.view(np.uint32)
            for j in range(n):
                bits[j] = np.uint32(x[s + j]) << np.uint32(16)
            return buf[:n]

        return widen

    def view(x, s, n, buf):
        return x[s : s + n]

    return view


@numba.njit(cache=True, nogil=True, inline="always")
def _finite(a):
    """False for NaN and +-inf (a compare, no branch)."""
    return np.abs(a) < _INF


# ------------------------------------------------------------------------------ the kernels


@_jit
def weight_average_chunk(p0, xs, s, n, w, out, check_p):
    """``out[:n] = sum_t w_t f32(x_t)`` (``f32(x_0) w_0`` then ``+= f32(x_t) w_t``); returns
    True if a result (or, with ``check_p``, a theta_0 entry) is not finite."""
    bad = False
    pbuf, xbuf = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for b in range(0, n, BLOCK):
        m = min(BLOCK, n - b)
        acc = out[b : b + m]
        x = _block(xs[0], s + b, m, xbuf)
        wt = w[0]
        for j in range(m):
            acc[j] = x[j] * wt
        for t in range(1, len(xs)):
            x = _block(xs[t], s + b, m, xbuf)
            wt = w[t]
            for j in range(m):
                acc[j] = acc[j] + x[j] * wt
        for j in range(m):
            bad |= not _finite(acc[j])
        if check_p:
            p = _block(p0, s + b, m, pbuf)
            for j in range(m):
                bad |= not _finite(p[j])
    return bad


@_jit
def task_arithmetic_chunk(p0, xs, s, n, lam, out):
    """``out[:n] = theta_0 + sum_t lam_t (x_t - theta_0)`` in the numpy kernel's order
    (``tau_0 lam_0``, ``+= tau_t lam_t``, ``+= theta_0``); returns True if a result is not finite
    (it is wherever an input is)."""
    bad = False
    pbuf, xbuf = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    for b in range(0, n, BLOCK):
        m = min(BLOCK, n - b)
        p = _block(p0, s + b, m, pbuf)
        acc = out[b : b + m]
        x = _block(xs[0], s + b, m, xbuf)
        lt = lam[0]
        for j in range(m):
            acc[j] = (x[j] - p[j]) * lt
        for t in range(1, len(xs)):
            x = _block(xs[t], s + b, m, xbuf)
            lt = lam[t]
            for j in range(m):
                acc[j] = acc[j] + (x[j] - p[j]) * lt
        for j in range(m):
            a = acc[j] + p[j]
            acc[j] = a
            bad |= not _finite(a)
    return bad


_U13, _U16 = np.uint32(13), np.uint32(16)
_M1, _M2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


@numba.njit(cache=True, nogil=True, inline="always")
def _mix32(x):
    """MurmurHash3 ``fmix32`` of a uint32 (:func:`mtl_jax.counter_random.mix32`); every step is
    truncated to uint32 (numba widens integer arithmetic), so the compiler keeps 32-bit lanes."""
    x = np.uint32(x ^ (x >> _U16))
    x = np.uint32(x * _M1)
    x = np.uint32(x ^ (x >> _U13))
    x = np.uint32(x * _M2)
    return np.uint32(x ^ (x >> _U16))


@_jit
def dare_keep_block(offset, increment, threshold, start, n, keep):
    """DARE keep mask (:func:`mtl_jax.merging.ties.dare_keep`) of entries ``[start, start + n)``
    of one leaf into ``keep`` bool (T, >= n): ``fmix32(counter * g_t + o_t) >= threshold``
    (uint32 counters, wrapping)."""
    for t in range(len(offset)):
        o, g = offset[t], increment[t]
        kt = keep[t]
        for j in range(n):
            c = np.uint32(start + j)
            kt[j] = _mix32(np.uint32(c * g + o)) >= threshold


@_jit
def dare_ta_chunk(p0, xs, s, n, position, offset, increment, threshold, scale, lam, out):
    """DARE with ``combine="ta"``: ``out[:n] = theta_0 + sum_t keep_t ((x_t - theta_0) / scale)
    lam_t`` (+0.0 where dropped; the sum starts from +0.0, as ``np.sum`` does); the keep masks of
    leaf entries ``[position, position + n)`` are drawn here (:func:`dare_keep_block`). Returns
    True if a task vector may not be finite, dropped ones included (as the numpy kernel, which
    checks each task vector before the drop): a per-entry sum of the task vectors (one vector add
    per task entry) is NaN or inf wherever one of them is (or, harmlessly, where finite ones
    overflow: the input check then finds nothing), tested once per block."""
    num = len(xs)
    bad = False
    pbuf, xbuf = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    keep = np.empty((num, BLOCK), np.bool_)
    nonfinite = np.empty(BLOCK, np.float32)
    for b in range(0, n, BLOCK):
        m = min(BLOCK, n - b)
        p = _block(p0, s + b, m, pbuf)
        acc = out[b : b + m]
        dare_keep_block(offset, increment, threshold, position + b, m, keep)
        for j in range(m):
            acc[j] = _ZERO
            nonfinite[j] = _ZERO
        for t in range(num):
            x = _block(xs[t], s + b, m, xbuf)
            lt = lam[t]
            kt = keep[t]
            for j in range(m):
                r = x[j] - p[j]
                nonfinite[j] = nonfinite[j] + r
                d = (r / scale) * lt
                acc[j] = acc[j] + (d if kt[j] else _ZERO)
        for j in range(m):
            acc[j] = acc[j] + p[j]
        for j in range(m):
            bad |= not _finite(nonfinite[j])
    return bad


@_jit
def consensus_ta_chunk(p0, xs, s, n, k, tall_lambda, lam, out):
    """Consensus TA: ``tau_MTL = sum_t tau_t`` (from +0.0), TALL masks ``|tau_t| > |tau_MTL -
    tau_t| lam_t``, ``out[:n] = theta_0 + lam * (tau_MTL where >= k masks agree, else +0.0)``.
    A block's task vectors are kept in a (T, BLOCK) scratch (L1 / L2) between the sum and the
    masks. Returns True if ``tau_MTL`` is not finite somewhere (it is wherever a task vector is)."""
    bad = False
    num = len(xs)
    pbuf, xbuf = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    tau = np.empty((num, BLOCK), np.float32)
    mtl = np.empty(BLOCK, np.float32)
    count = np.empty(BLOCK, np.int32)
    for b in range(0, n, BLOCK):
        m = min(BLOCK, n - b)
        p = _block(p0, s + b, m, pbuf)
        for j in range(m):
            mtl[j] = _ZERO
            count[j] = 0
        for t in range(num):
            x = _block(xs[t], s + b, m, xbuf)
            tt = tau[t]
            for j in range(m):
                r = x[j] - p[j]
                tt[j] = r
                mtl[j] = mtl[j] + r
        for j in range(m):
            bad |= not _finite(mtl[j])
        for t in range(num):
            tt = tau[t]
            lt = tall_lambda[t]
            for j in range(m):
                r = tt[j]
                count[j] += np.abs(r) > np.abs(mtl[j] - r) * lt
        acc = out[b : b + m]
        for j in range(m):
            v = mtl[j] if count[j] >= k else _ZERO
            acc[j] = v * lam + p[j]
    return bad


@intrinsic
def _bits(typingctx, x):
    """The bit pattern of a float32 as int32 (a register move)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _ties_block_exact(p, xs, s, b, m, lo, hi, above, xbuf, total, up, down, nonfinite, n_up, n_down, n_kept, inside):
    """One block of :func:`ties_chunk` for any input (NaN / inf, ``hi_t = 0``): per task keep
    ``|tau_t| >= hi_t`` (counted into ``above`` with the NaNs, which rank above every threshold
    and are never kept), the trimmed sum, the kept positive entries' sum and the negative ones'
    magnitudes with their counts, whether some entry lies in its bracket. Returns True if a task
    vector may not be finite (the per-entry sum of ``|tau_t|`` is not)."""
    for j in range(m):
        total[j], up[j], down[j], nonfinite[j] = _ZERO, _ZERO, _ZERO, _ZERO
        n_up[j], n_down[j], n_kept[j] = 0, 0, 0
        inside[j] = False
    for t in range(len(xs)):
        x = _block(xs[t], s + b, m, xbuf)
        h, l = hi[t], lo[t]
        counted = 0
        for j in range(m):
            tau = x[j] - p[j]
            mag = np.abs(tau)
            kept = mag >= h
            nonfinite[j] = nonfinite[j] + mag  # NaN / inf where a tau is (or on overflow)
            counted += not (mag < h)  # kept, or NaN
            inside[j] |= (mag >= l) & (mag < h)
            n_kept[j] += kept
            v = tau if kept else _ZERO
            total[j] = total[j] + v
            pos, neg = v > _ZERO, v < _ZERO
            up[j] = up[j] + (v if pos else _ZERO)
            down[j] = down[j] + (-v if neg else _ZERO)
            n_up[j] += pos
            n_down[j] += neg
        above[t] += counted
    bad = False
    for j in range(m):
        bad |= not _finite(nonfinite[j])
    return bad


@numba.njit(cache=True, nogil=True, inline="always")
def _ties_entry(x, p, h, l, tot, up, down, n_up, n_kept, n_lo):
    """One task entry of :func:`_ties_block_finite`: ``tau = x - p`` kept if ``|tau| >= h``; the
    position's running trimmed sum, positive kept sum, negative kept magnitudes, and counts of
    positive kept, kept and ``>= l`` entries, updated; also (kept, the bits of ``|tau|``)."""
    tau = x - p
    mag = np.abs(tau)
    kept = mag >= h
    v = tau if kept else _ZERO
    return (tot + v, up + (v if v > _ZERO else _ZERO), down + (mag if v < _ZERO else _ZERO),  # -v: |v| for v < 0
            np.int32(n_up + (v > _ZERO)), np.int32(n_kept + kept), np.int32(n_lo + (mag >= l)), kept, _bits(mag))


@numba.njit(cache=True, nogil=True, inline="always")
def _ties_four_tasks(p, x0, x1, x2, x3, t, m, lo, hi, above, total, up, down, n_up, n_kept, n_lo, largest):
    """Tasks ``t .. t + 3`` of a block in one loop (each position's sums and counts loaded and
    stored once for the four, updated in task order); returns the running largest ``|tau|``
    bit pattern."""
    h0, h1, h2, h3 = hi[t], hi[t + 1], hi[t + 2], hi[t + 3]
    l0, l1, l2, l3 = lo[t], lo[t + 1], lo[t + 2], lo[t + 3]
    c0, c1, c2, c3 = np.uint32(0), np.uint32(0), np.uint32(0), np.uint32(0)
    for j in range(m):
        pj = p[j]
        a, u, d, nu, nk, nl = total[j], up[j], down[j], n_up[j], n_kept[j], n_lo[j]
        a, u, d, nu, nk, nl, k0, b0 = _ties_entry(x0[j], pj, h0, l0, a, u, d, nu, nk, nl)
        a, u, d, nu, nk, nl, k1, b1 = _ties_entry(x1[j], pj, h1, l1, a, u, d, nu, nk, nl)
        a, u, d, nu, nk, nl, k2, b2 = _ties_entry(x2[j], pj, h2, l2, a, u, d, nu, nk, nl)
        a, u, d, nu, nk, nl, k3, b3 = _ties_entry(x3[j], pj, h3, l3, a, u, d, nu, nk, nl)
        total[j], up[j], down[j], n_up[j], n_kept[j], n_lo[j] = a, u, d, nu, nk, nl
        c0, c1 = np.uint32(c0 + k0), np.uint32(c1 + k1)
        c2, c3 = np.uint32(c2 + k2), np.uint32(c3 + k3)
        largest = max(largest, max(max(b0, b1), max(b2, b3)))
    above[t] += c0
    above[t + 1] += c1
    above[t + 2] += c2
    above[t + 3] += c3
    return largest


@numba.njit(cache=True, nogil=True, inline="always")
def _ties_block_finite(p, xs, s, b, m, lo, hi, above, xbufs, total, up, down, n_up, n_kept, n_lo):
    """:func:`_ties_block_exact` for a block without NaN / inf task vectors when every
    ``hi_t > 0`` (a kept entry is then non-zero: positive or negative), with fewer vector
    operations per task entry: the count above ``hi_t`` is the kept count, the negative kept
    count is ``n_kept - n_up`` and a position has a bracket entry iff more of its entries are
    ``>= lo_t`` (``n_lo``) than kept; 32-bit integer lanes throughout; four tasks per loop
    (:func:`_ties_four_tasks`). Returns False (and leaves ``above`` as it was) if the block holds
    a NaN / inf task vector (the largest ``|tau_t|`` bit pattern, an integer max per lane,
    reaches +inf's): the caller runs the exact block instead. ``xbufs``: (4, BLOCK) fp32."""
    for j in range(m):
        total[j], up[j], down[j] = _ZERO, _ZERO, _ZERO
        n_up[j], n_kept[j], n_lo[j] = 0, 0, 0
    num = len(xs)
    largest = np.int32(0)
    t = 0
    while t + 4 <= num:
        x0, x1 = _block(xs[t], s + b, m, xbufs[0]), _block(xs[t + 1], s + b, m, xbufs[1])
        x2, x3 = _block(xs[t + 2], s + b, m, xbufs[2]), _block(xs[t + 3], s + b, m, xbufs[3])
        largest = _ties_four_tasks(p, x0, x1, x2, x3, t, m, lo, hi, above, total, up, down, n_up, n_kept, n_lo, largest)
        t += 4
    while t < num:
        x = _block(xs[t], s + b, m, xbufs[0])
        h, l = hi[t], lo[t]
        counted = np.uint32(0)
        for j in range(m):
            a, u, d, nu, nk, nl, k, bits = _ties_entry(x[j], p[j], h, l, total[j], up[j], down[j], n_up[j], n_kept[j],
                                                       n_lo[j])
            total[j], up[j], down[j], n_up[j], n_kept[j], n_lo[j] = a, u, d, nu, nk, nl
            counted = np.uint32(counted + k)
            largest = max(largest, bits)
        above[t] += counted
        t += 1
    if largest >= _INF_BITS:
        for t in range(num):  # take this block's counts back
            x = _block(xs[t], s + b, m, xbufs[0])
            h = hi[t]
            counted = np.uint32(0)
            for j in range(m):
                counted = np.uint32(counted + (np.abs(x[j] - p[j]) >= h))
            above[t] -= counted
        return False
    return True


@_jit
def ties_chunk(p0, xs, s, n, lo, hi, lam, out, above, positions, aside_p, aside_tau, candidates, num_candidates):
    """The global TIES output of one chunk given brackets ``[lo_t, hi_t)`` of the thresholds (as
    ``_TiesKernel`` of :mod:`mtl_jax.merging.streaming.ties_global`, fused): per task keep
    ``|tau_t| >= hi_t`` (counted into ``above``, with the NaNs), trimmed sum from +0.0, elected
    sign in {-1, 0, 1}, disjoint mean ``s * sum_{t: trimmed_t s > 0} trimmed_t s / max(|A|, 1)``,
    ``out[:n] = theta_0 + lam * mean``. Positions with an entry inside a bracket, or whose trimmed
    sum cancels to 0 with kept entries, are kept aside: their chunk-relative positions, theta_0
    and tau go to ``positions``, ``aside_p`` and the columns of ``aside_tau`` (T, >= n), and each
    task's entries of theirs inside its bracket (``|tau_t|``, in position order) to
    ``candidates[t, :num_candidates[t]]``.

    One loop over the tasks: besides the trimmed sum it adds up the positive kept entries and the
    magnitudes of the negative ones (each in task order from +0.0, with their counts), so the
    disjoint mean of either elected sign is ready when the sign is: for ``s = 1`` the agreeing
    set is ``trimmed_t > 0`` and its sum ``sum trimmed_t``, for ``s = -1`` it is ``trimmed_t <
    0`` and ``sum -trimmed_t`` (``trimmed_t * s`` exactly), the same additions as the numpy
    kernel's masked sum (its +0.0 terms leave a non-negative partial sum unchanged). Blocks
    without NaN / inf task vectors take :func:`_ties_block_finite` when every ``0 < hi_t`` and
    ``lo_t <= hi_t``, the others :func:`_ties_block_exact`: the same results.

    Returns ``(number of positions kept aside, sum of the elected signs of the others, True if a
    task vector may not be finite)``.
    """
    num = len(xs)
    bad = False
    finite_path = True
    for t in range(num):
        finite_path &= (hi[t] > _ZERO) & (lo[t] <= hi[t])
        num_candidates[t] = 0
    deferred, majority = 0, 0
    pbuf, xbufs = np.empty(BLOCK, np.float32), np.empty((4, BLOCK), np.float32)
    xbuf = xbufs[0]
    total, up, down = np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)
    nonfinite = np.empty(BLOCK, np.float32)
    n_up, n_down, n_kept = np.empty(BLOCK, np.int32), np.empty(BLOCK, np.int32), np.empty(BLOCK, np.int32)
    inside, undecided = np.empty(BLOCK, np.bool_), np.empty(BLOCK, np.bool_)
    for b in range(0, n, BLOCK):
        m = min(BLOCK, n - b)
        p = _block(p0, s + b, m, pbuf)
        if finite_path and _ties_block_finite(p, xs, s, b, m, lo, hi, above, xbufs, total, up, down, n_up, n_kept,
                                              n_down):
            for j in range(m):  # n_down holds the counts >= lo_t here
                inside[j] = n_down[j] > n_kept[j]
                n_down[j] = n_kept[j] - n_up[j]
        else:
            bad |= _ties_block_exact(p, xs, s, b, m, lo, hi, above, xbuf, total, up, down, nonfinite, n_up, n_down,
                                     n_kept, inside)
        acc = out[b : b + m]
        num_undecided, block_majority = np.int32(0), np.int32(0)
        for j in range(m):
            tj = total[j]
            pos, neg = tj > _ZERO, tj < _ZERO
            sg = np.float32(pos) - np.float32(neg)
            und = inside[j] | ((n_kept[j] > 0) & (sg == _ZERO))
            undecided[j] = und
            num_undecided = np.int32(num_undecided + und)
            block_majority = np.int32(block_majority + (0 if und else np.int32(pos) - np.int32(neg)))
            agreeing = (up[j] if pos else _ZERO) + (down[j] if neg else _ZERO)  # + 0.0: exact
            count = (n_up[j] if pos else np.int32(0)) + (n_down[j] if neg else np.int32(0))
            mean = (agreeing * sg) / np.float32(max(count, 1))
            acc[j] = mean * lam + p[j]
        majority += block_majority
        if num_undecided:
            first = deferred
            words = undecided[: m // 8 * 8].view(np.uint64)  # 8 positions at a time
            for w in range(len(words)):
                if words[w]:
                    for j in range(8 * w, 8 * w + 8):
                        positions[deferred] = b + j
                        deferred += undecided[j]
            for j in range(m // 8 * 8, m):
                positions[deferred] = b + j
                deferred += undecided[j]
            for i in range(first, deferred):
                aside_p[i] = p[positions[i] - b]
            for t in range(num):
                x = _block(xs[t], s + b, m, xbuf)
                l, h = lo[t], hi[t]
                row, found = aside_tau[t], candidates[t]
                k = num_candidates[t]
                for i in range(first, deferred):
                    j = positions[i] - b
                    r = x[j] - p[j]
                    row[i] = r
                    mag = np.abs(r)
                    found[k] = mag
                    k += (mag >= l) & (mag < h)
                num_candidates[t] = k
    return deferred, majority, bad


@_jit
def ties_deferred_signs(tau, thr, signs):
    """Elected signs of kept-aside positions given the exact thresholds: ``signs[i] = sign(sum_t
    tau_t if |tau_t| >= thr_t else +0.0)`` (int8, tau (T, n)). Returns (sum of the signs, True if
    a kept entry is not finite: the caller uses the numpy path then)."""
    num, n = tau.shape
    total = np.zeros(n, np.float32)
    nonfinite = False
    for t in range(num):
        row, h = tau[t], thr[t]
        for j in range(n):
            r = row[j]
            kept = np.abs(r) >= h
            nonfinite |= kept and not _finite(r)
            total[j] = total[j] + (r if kept else _ZERO)
    majority = 0
    for j in range(n):
        sg = np.int8(total[j] > _ZERO) - np.int8(total[j] < _ZERO)
        signs[j] = sg
        majority += sg
    return majority, nonfinite


@_jit
def ties_deferred_outputs(tau, p0, thr, signs, majority, lam, out):
    """Outputs of kept-aside positions: ``out = lam * mean + theta_0`` with the disjoint mean of
    the elected sign (the model-wide ``majority`` where it is 0), as
    :func:`mtl_jax.merging.streaming.kernels.disjoint_mean_np` (finite kept entries)."""
    num, n = tau.shape
    agree = np.zeros(n, np.float32)
    count = np.zeros(n, np.int32)
    elected = np.empty(n, np.float32)
    for j in range(n):
        elected[j] = np.float32(signs[j]) if signs[j] != 0 else majority
    for t in range(num):
        row, h = tau[t], thr[t]
        for j in range(n):
            r = row[j]
            v = (r if np.abs(r) >= h else _ZERO) * elected[j]
            a = v > _ZERO
            agree[j] = agree[j] + (v if a else _ZERO)
            count[j] = np.int32(count[j] + a)
    for j in range(n):
        mean = (agree[j] * elected[j]) / np.float32(max(count[j], 1))
        out[j] = lam * mean + p0[j]


# --------------------------------------------------------------------- Python-side kernels


def kernel_input(x: np.ndarray) -> Optional[np.ndarray]:
    """A flat input as the fused kernels take it: fp32 as is, bf16 as its uint16 bit pattern;
    None for other dtypes (cast first)."""
    if x.dtype == np.float32:
        return x
    if x.dtype == _BF16:
        return x.view(np.uint16)
    return None


def chunk_inputs(ws: Workspace, p0: np.ndarray, fts: Sequence[np.ndarray], s: int, e: int
                 ) -> tuple[np.ndarray, tuple[np.ndarray, ...], int]:
    """``(theta_0, (theta_t, ...), start)`` of chunk ``[s, e)`` for a fused kernel: the whole flat
    leaves and ``start = s`` when every theta_t has one fp32 / bf16 array type; else fp32 copies of
    the chunk in ``ws.inputs`` (fp16, mixed dtypes) and ``start = 0``."""
    p, xs = kernel_input(p0), [kernel_input(f) for f in fts]
    first = xs[0]
    if p is not None and first is not None and all(
            x is not None and x.dtype == first.dtype and x.flags.writeable == first.flags.writeable
            and x.flags.aligned == first.flags.aligned for x in xs):
        return p, tuple(xs), s
    rows = ws.inputs[:, : e - s]
    for i, x in enumerate([p0, *fts]):
        np.copyto(rows[i], x[s:e], casting="unsafe")
    return rows[0], tuple(rows[1:]), 0


def weight_average_kernel(w: np.ndarray) -> Callable:
    """Fused :func:`mtl_jax.merging.streaming.kernels.weight_average_kernel`."""
    w = np.asarray(w, np.float32)

    def kernel(ws, index, p0, fts, out, s, e):
        p, xs, start = chunk_inputs(ws, p0, fts, s, e)
        acc = fp32_slot(ws, out, s, e)
        if weight_average_chunk(p, xs, start, e - s, w, acc, ws.finite is not None):
            ws.check(p0, fts, s, e)
        store(out, s, e, acc)

    return kernel


def task_arithmetic_kernel(lam: np.ndarray) -> Callable:
    """Fused :func:`mtl_jax.merging.streaming.kernels.task_arithmetic_kernel`."""
    lam = np.asarray(lam, np.float32)

    def kernel(ws, index, p0, fts, out, s, e):
        p, xs, start = chunk_inputs(ws, p0, fts, s, e)
        acc = fp32_slot(ws, out, s, e)
        if task_arithmetic_chunk(p, xs, start, e - s, lam, acc):
            ws.check(p0, fts, s, e)
        store(out, s, e, acc)

    return kernel


def dare_ta_kernel(key: jax.Array, p: float, lam: np.ndarray) -> Callable:
    """Fused :func:`mtl_jax.merging.streaming.kernels.dare_ta_kernel`: the same keep masks
    (:func:`mtl_jax.merging.ties.dare_keep`'s counter hash, drawn in the kernel from the leaf's
    stream constants)."""
    lam = np.asarray(lam, np.float32)
    scale = np.float32(1.0 - p)
    threshold = np.uint32(drop_threshold(p))
    streams: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # per leaf; the workers share it

    def kernel(ws, index, p0, fts, out, s, e):
        if (index, len(fts)) not in streams:
            streams[index, len(fts)] = leaf_streams(key, index, len(fts))
        offset, inc = streams[index, len(fts)]
        p_, xs, start = chunk_inputs(ws, p0, fts, s, e)
        acc = fp32_slot(ws, out, s, e)
        if dare_ta_chunk(p_, xs, start, e - s, s, offset, inc, threshold, scale, lam, acc):
            ws.check(p0, fts, s, e)
        store(out, s, e, acc)

    return kernel


_dare_streams = jax.jit(dare_streams, static_argnums=2)


def leaf_streams(key: jax.Array, index: int, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mtl_jax.merging.ties.dare_streams` of leaf ``index`` as uint32 numpy arrays (T,)."""
    offset, inc = _dare_streams(key, np.uint32(index), num_tasks)
    return np.asarray(offset, np.uint32), np.asarray(inc, np.uint32)


def consensus_ta_kernel(k: int, tall_lambda: np.ndarray, lam: float) -> Callable:
    """Fused :func:`mtl_jax.merging.streaming.kernels.consensus_ta_kernel`."""
    tall = np.asarray(tall_lambda, np.float32)
    lam32 = np.float32(lam)

    def kernel(ws, index, p0, fts, out, s, e):
        p, xs, start = chunk_inputs(ws, p0, fts, s, e)
        acc = fp32_slot(ws, out, s, e)
        if consensus_ta_chunk(p, xs, start, e - s, int(k), tall, lam32, acc):
            ws.check(p0, fts, s, e)
        store(out, s, e, acc)

    return kernel


def dare_keep_chunk(key: jax.Array, index: int, start: int, n: int, num_tasks: int, p: float) -> np.ndarray:
    """The keep mask the fused DARE kernel draws for entries ``[start, start + n)`` of leaf
    ``index``: bool (T, n) (equal to :func:`mtl_jax.merging.ties.dare_keep`; for tests)."""
    offset, inc = leaf_streams(key, index, num_tasks)
    keep = np.empty((num_tasks, n), np.bool_)
    dare_keep_block(offset, inc, np.uint32(drop_threshold(p)), start, n, keep)
    return keep


def warm_up() -> None:
    """Start numba's compiler (its registries) and load a cached function: what the first
    kernel call would otherwise pay (:mod:`mtl_jax.merging.background_import`)."""
    _finite(np.float32(0.0))


class TiesChunks:
    """Runs :func:`ties_chunk` over one worker's chunks."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, lam: np.float32, above: np.ndarray):
        self.lo, self.hi, self.lam = np.asarray(lo, np.float32), np.asarray(hi, np.float32), np.float32(lam)
        self.above = above  # int64 (T,): entries ranking above hi_t, added to
        num = len(self.lo)
        self.positions = np.empty((CHUNK,), np.int64)
        self.aside_p = np.empty((CHUNK,), np.float32)
        self.aside_tau = np.empty((num, CHUNK), np.float32)
        self.candidates = np.empty((num, CHUNK), np.float32)
        self.num_candidates = np.zeros((num,), np.int64)

    def __call__(self, ws: Workspace, p0: np.ndarray, fts: Sequence[np.ndarray], out: np.ndarray, s: int, e: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], int]:
        """Fills ``out[s:e]``; returns the positions kept aside (chunk-relative) with their theta_0
        (n,) and tau (T, n), each task's bracket entries among them, and the sum of the other
        positions' signs (copies: the buffers are reused by the next chunk)."""
        p, xs, start = chunk_inputs(ws, p0, fts, s, e)
        acc = fp32_slot(ws, out, s, e)
        num, majority, bad = ties_chunk(p, xs, start, e - s, self.lo, self.hi, self.lam, acc, self.above,
                                        self.positions, self.aside_p, self.aside_tau, self.candidates,
                                        self.num_candidates)
        if bad:
            ws.check(p0, fts, s, e)
        store(out, s, e, acc)
        found = [self.candidates[t, :k].copy() for t, k in enumerate(self.num_candidates)]
        return (self.positions[:num].copy(), self.aside_p[:num].copy(), self.aside_tau[:, :num].copy(), found,
                int(majority))


def ties_patch_values(tau: np.ndarray, p0: np.ndarray, thr: np.ndarray, majority_count: int, lam: np.float32
                      ) -> Optional[np.ndarray]:
    """Outputs of the kept-aside positions (tau fp32 (T, n), theta_0 (n,)) given the exact
    thresholds and the elected-sign count of the other positions (``majority_count``): the
    model-wide majority is ``sign(majority_count + sum of these positions' signs)``. None if a
    kept entry is not finite (the caller's numpy path handles those)."""
    signs = np.empty((tau.shape[1],), np.int8)
    count, nonfinite = ties_deferred_signs(tau, thr, signs)
    if nonfinite:
        return None
    majority = np.float32(np.sign(majority_count + int(count)))
    out = np.empty((tau.shape[1],), np.float32)
    ties_deferred_outputs(tau, p0, thr, signs, majority, np.float32(lam), out)
    return out


_KEY_SHIFT = 15  # order statistics bin non-negative float32 bit patterns by bits >> 15 (2**16 bins)


@_jit
def order_statistics(values, ranks, out):
    """``out[t, i]`` = the ``ranks[i]``-th smallest entry (0-indexed) of row t of ``values`` (T,
    n) fp32, entries non-negative (``|x|``: +0.0, NaN with a clear sign bit), as
    ``np.partition(values, ranks, axis=1)[:, ranks]``: the bit patterns of non-negative floats
    are ordered as the floats (NaN above +inf, as numpy sorts it). A radix select: one pass counts
    ``bits >> 15``, a second keeps the entries of the bins holding the ranks, which are sorted."""
    num, n = values.shape
    hist = np.empty(1 << (31 - _KEY_SHIFT), np.int64)
    for t in range(num):
        bits = values[t].view(np.int32)
        hist[:] = 0
        for j in range(n):
            hist[bits[j] >> _KEY_SHIFT] += 1
        for i in range(len(ranks)):
            r, below, key = ranks[i], 0, 0
            while below + hist[key] <= r:
                below += hist[key]
                key += 1
            members = np.empty(hist[key], np.int32)
            c = 0
            for j in range(n):
                if bits[j] >> _KEY_SHIFT == key:
                    members[c] = bits[j]
                    c += 1
            members.sort()
            out[t, i] = members[r - below : r - below + 1].view(np.float32)[0]
