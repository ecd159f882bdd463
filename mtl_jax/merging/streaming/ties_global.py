"""Global TIES (Yadav et al. 2023, Sec. 3) streamed, exact, in two passes when the sample
bracket of the threshold holds (the usual case): :func:`stream_ties_global`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from mtl_jax.merging.streaming.kernels import disjoint_mean_np, fp32_slot, fused_loader, masked, sign_into, store
from mtl_jax.merging.streaming.passes import chunk_pass
from mtl_jax.merging.streaming.planning import Stream
from mtl_jax.merging.streaming.ties_threshold import (
    bucket_entries,
    count_at_least,
    kept_count,
    sampled_bracket,
    thresholds_from_workers,
    threshold_buckets,
)


@dataclasses.dataclass
class _Deferred:
    """Entries of one leaf whose TIES output needs the exact thresholds or the majority sign:
    flat positions, theta_0 (n,) and tau (T, n), fp32."""

    name: str
    index: np.ndarray
    p0: np.ndarray
    tau: np.ndarray


def stream_ties_global(stream: Stream, writer: Any, top_k: float, lam: float) -> None:
    """Global TIES (:func:`mtl_jax.merging.ties.ties_merging`, Yadav et al. 2023, Sec. 3), exact,
    in two passes over the inputs when the sample bracket holds (the usual case):

    1. :func:`sampled_bracket` (reads ~1/100 of the entries at 100M parameters): each task's k-th
       largest |tau_t| should lie in a bracket ``[lo_t, hi_t)``.
    2. the output pass (:func:`_ties_output_pass`): entries outside the bracket are kept or dropped
       as by the exact threshold; positions with a bracket entry are kept aside and patched once
       the pass has counted the entries above each ``hi_t`` exactly.

    If the counts show a bracket missed its threshold (or no bracket was drawn), the output is
    rewound and written again from the exact histogram buckets (:func:`threshold_buckets`): one
    or two more passes, the same result.
    """
    fused_loader()  # numba loads in the background during the sample pass
    k = kept_count(stream, top_k)
    if k > 0:
        bracket = sampled_bracket(stream, k)
        if bracket is not None and _ties_output_pass(stream, writer, *bracket, k, lam):
            return
        writer.rewind()
    buckets = threshold_buckets(stream, top_k)
    if not _ties_output_pass(stream, writer, buckets.lo, buckets.hi, k, lam):
        raise AssertionError("TIES histogram buckets missed the k-th largest |tau| (a bug)")


class _TiesKernel:
    """The TIES output kernel of one worker (:func:`_ties_output_pass`) and what it accumulates:
    the majority count of the decided positions, the exact counts above ``hi_t`` and the
    kept-aside positions."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, lam: np.float32, names: Sequence[str]):
        self.lo, self.hi, self.lam, self.names = lo, hi, lam, names
        self.deferred: list[_Deferred] = []
        self.candidates: list[list[np.ndarray]] = [[] for _ in lo]
        self.majority = 0
        self.above = np.zeros(lo.shape, np.int64)

    def __call__(self, ws, index, p0, fts, out, s, e):
        n = e - s
        p, tau = ws.task_vectors(p0, fts, s, e, check=False)
        mag, kept, inside = ws.work[:, :n], ws.mask[:, :n], ws.mask2[:, :n]
        sign, undecided = ws.row[:n], ws.flags[0, :n]
        np.abs(tau, out=mag)
        np.greater_equal(mag, self.hi[:, None], out=kept)
        if not count_at_least(mag, self.hi, kept, self.above):  # |tau| sums to NaN / inf
            ws.check(p0, fts, s, e)
        np.greater_equal(mag, self.lo[:, None], out=inside)
        np.greater(inside, kept, out=inside)  # in the bracket: lo <= |tau| < hi
        np.any(inside, axis=0, out=undecided)
        trimmed = masked(tau, kept, mag)
        np.sum(trimmed, axis=0, out=sign)
        sign_into(sign, sign, ws.flags[1:, :n])
        # an exactly cancelling sum of kept (so non-zero) entries: the majority sign decides
        cancels = np.any(kept, axis=0, out=ws.flags[1, :n])
        cancels &= sign == 0
        undecided |= cancels
        pos = np.flatnonzero(undecided)
        self.majority += int(np.sum(sign)) - int(np.sum(sign[pos]))
        if len(pos):
            self.keep_aside(_Deferred(self.names[index], pos + s, p[pos], tau[:, pos]))
        merged = disjoint_mean_np(trimmed, sign, tau, kept, fp32_slot(ws, out, s, e), ws.count[:n])
        merged *= self.lam
        merged += p
        store(out, s, e, merged)

    def keep_aside(self, aside: _Deferred, found: Optional[Sequence[np.ndarray]] = None) -> None:
        """Keep positions aside for the patches; their bracket entries (``found``, per task, when
        the caller has them) are threshold candidates."""
        self.deferred.append(aside)
        if found is None:
            found = bucket_entries(np.abs(aside.tau), self.lo, self.hi)
        for t, x in enumerate(found):
            self.candidates[t].append(x)


class _FusedTiesKernel(_TiesKernel):
    """:class:`_TiesKernel` run by the fused output kernel
    (:func:`mtl_jax.merging.streaming.fused.ties_chunk`) once ``loader`` has it (numpy until
    then): the same outputs, counts, majority, kept-aside positions (theta_0 and tau copied out
    by the kernel) and candidates."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, lam: np.float32, names: Sequence[str], loader: Any):
        super().__init__(lo, hi, lam, names)
        self.loader, self.chunks = loader, None

    def __call__(self, ws, index, p0, fts, out, s, e):
        if self.chunks is None:
            fused = self.loader.ready()
            if fused is None:
                return super().__call__(ws, index, p0, fts, out, s, e)
            self.chunks = fused.TiesChunks(self.lo, self.hi, self.lam, self.above)
        pos, p, tau, found, majority = self.chunks(ws, p0, fts, out, s, e)
        self.majority += majority
        if len(pos):
            self.keep_aside(_Deferred(self.names[index], pos + s, p, tau), found)


def _ties_output_pass(stream: Stream, writer: Any, lo: np.ndarray, hi: np.ndarray, k: int, lam: float) -> bool:
    """The TIES output pass given a bracket ``[lo_t, hi_t)`` of each task's threshold (``lo = hi``:
    the exact threshold). Every position where no task has an entry in its bracket gets its
    elected sign, disjoint mean and output now, and adds its sign to the model-wide majority
    count. Positions with a bracket entry, and those whose trimmed sum is exactly 0 with non-zero
    entries (where the majority sign decides), are kept aside (position, theta_0, tau). After the
    pass the exact counts above ``hi_t`` and the bracket entries give the exact thresholds, the
    kept-aside positions complete the majority count, and their outputs are patched into the
    written leaves. Returns False (nothing patched) if some threshold is outside its bracket.
    """
    lam32 = np.float32(lam)
    loader = fused_loader()
    if loader is None:
        make = lambda: _TiesKernel(lo, hi, lam32, stream.names)
    else:
        make = lambda: _FusedTiesKernel(lo, hi, lam32, stream.names, loader)
    kernels = chunk_pass(stream, "merge", make, writer)
    deferred = [d for kern in kernels for d in kern.deferred]
    majority_count = sum(kern.majority for kern in kernels)
    thr = thresholds_from_workers(kernels, lo, hi, k)
    if thr is None:
        return False
    patches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    values = _patch_values(deferred, thr, majority_count, lam32, loader)
    for d, v in zip(deferred, values):
        patches.setdefault(d.name, []).append((d.index, v))
    for name, pieces in patches.items():  # one patch per leaf
        writer.patch(name, np.concatenate([i for i, _ in pieces]), np.concatenate([v for _, v in pieces]))
    return True


def _patch_values(deferred: Sequence[_Deferred], thr: np.ndarray, majority_count: int, lam32: np.float32,
                  loader: Any) -> list[np.ndarray]:
    """Outputs of the kept-aside positions (one array per :class:`_Deferred`): trimmed by the
    exact thresholds, elected sign (the model-wide majority where it is 0: ``majority_count`` plus
    these positions' signs), disjoint mean. Fused (:func:`mtl_jax.merging.streaming.fused.ties_patch_values`)
    when the loader has the kernels, numpy otherwise or where a kept entry is not finite."""
    if not deferred:
        return []
    fused = loader.ready() if loader is not None else None
    if fused is not None:
        tau = np.concatenate([d.tau for d in deferred], axis=1)
        p0 = np.concatenate([d.p0 for d in deferred])
        merged = fused.ties_patch_values(tau, p0, thr, majority_count, lam32)
        if merged is not None:
            return np.split(merged, np.cumsum([len(d.index) for d in deferred])[:-1])
    # C order: the sums over axis 0 add the tasks in order (a (T, n) array with the tasks contiguous,
    # as numpy's fancy indexing leaves d.tau, would be summed pairwise, with other roundings)
    trimmed = [np.ascontiguousarray(np.where(np.abs(d.tau) >= thr[:, None], d.tau, np.float32(0.0)))
               for d in deferred]
    signs = [np.sign(np.sum(x, axis=0)) for x in trimmed]
    majority = np.float32(np.sign(majority_count + sum(int(np.sum(x)) for x in signs)))
    values = []
    for d, x, sign in zip(deferred, trimmed, signs):
        n = len(d.index)
        merged = disjoint_mean_np(x, np.where(sign == 0, majority, sign), np.empty_like(x),
                                   np.empty(x.shape, np.bool_), np.empty((n,), np.float32), np.empty((n,), np.int32))
        values.append(lam32 * merged + d.p0)
    return values
