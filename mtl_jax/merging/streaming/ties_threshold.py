"""Model-wide statistics of the streaming TIES-style merges: the exact global TIES threshold
(the k-th largest |tau_t| over the whole model, Yadav et al. 2023) and the majority sign.

The threshold search, exact, usually in two passes: a sample pass reads every p-th entry (p >= 64
prime; ~1M entries per task at 100M parameters) and brackets each task's k-th largest |tau_t| by
binomial order-statistic bounds (:func:`sampled_bracket`); a second pass counts exactly the
entries above each bracket and keeps the entries inside it, which give the exact threshold if it
lies in the bracket (:func:`rank_in_bracket`). If it does not (or the model is too small for a
useful sample), a histogram pass buckets the float32 bit pattern of every |tau_t| (``bits >>
14``, exact int64 counts; monotone for non-negative floats, as in
:func:`mtl_jax.merging.threshold.kth_largest_abs`, :func:`threshold_buckets`) and the counting
pass runs on the bucket. Same value and tie rule (keep ``|x| >= v_k``; NaN ranks above inf and is
never kept) as the in-memory code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from mtl_jax.merging.streaming.cores import hparams_key, run_pass
from mtl_jax.merging.streaming.kernels import CHUNK, Workspace, fused_loader, spans
from mtl_jax.merging.streaming.passes import chunk_pass, leaf_pass
from mtl_jax.merging.streaming.planning import Stream, leaf_working_set
from mtl_jax.merging.threshold import INF_BITS, num_kept

_HIST_SHIFT = 14  # the TIES histogram bins |tau| by its float32 bit pattern >> 14 (2**17 bins)
_NUM_BINS = 1 << (31 - _HIST_SHIFT)
SAMPLE_ENTRIES = 1 << 23  # |tau| entries (all tasks) in the TIES threshold sample: 32 MiB fp32
SAMPLE_Z = 4.0  # the sample bracket's half-width in binomial standard deviations
MAX_BAND_FRACTION = 0.02  # a wider bracket (kept aside per task) -> the histogram pass instead


def _select_from_top(hist: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a (T, B) histogram: the bin b holding the k-th largest entry (counting from the
    top bin) and the rank of that entry inside bin b (1-indexed)."""
    above = np.cumsum(hist[:, ::-1], axis=1)
    idx_from_top = np.argmax(above >= k[:, None], axis=1)
    bins = hist.shape[1] - 1 - idx_from_top
    before = np.take_along_axis(above, idx_from_top[:, None], 1)[:, 0] - hist[np.arange(len(k)), bins]
    return bins, k - before


@dataclasses.dataclass(frozen=True)
class ThresholdBuckets:
    """Where each task's exact TIES threshold (the k-th largest |tau_t| over the model) lies: in
    ``[lo_t, hi_t)`` (fp32 (T,)) as the ``rank_t``-th largest entry there. A task whose threshold
    is already exact has ``lo_t = hi_t = threshold`` (+inf for k = 0 or when the k-th largest is
    inf/NaN: the in-memory search clips at inf)."""

    lo: np.ndarray
    hi: np.ndarray
    rank: np.ndarray

    def threshold(self, candidates: Sequence[np.ndarray]) -> np.ndarray:
        """Exact thresholds from each task's entries in its bucket (all of them, any order)."""
        thr = self.lo.copy()
        for t, c in enumerate(candidates):
            if self.lo[t] < self.hi[t]:
                c = np.concatenate(c)
                thr[t] = np.partition(c, len(c) - self.rank[t])[len(c) - self.rank[t]]
        return thr


def bucket_entries(magnitudes: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Per task, the entries of ``magnitudes`` (T, n) inside that task's bucket ``[lo_t, hi_t)``."""
    inside = (magnitudes >= lo[:, None]) & (magnitudes < hi[:, None])
    return [m[i] for m, i in zip(magnitudes, inside)]


def count_at_least(magnitudes: np.ndarray, hi: np.ndarray, kept: np.ndarray, counts: np.ndarray) -> bool:
    """Add to ``counts`` (int64 (T,)) the entries of ``magnitudes`` (T, n) that rank above
    ``hi_t``: ``|tau| >= hi_t`` (the bool (T, n) ``kept``, already computed) plus NaNs (which the
    in-memory bisection counts above +inf but never keeps). Returns False if ``magnitudes`` may
    hold NaN / inf (its sum is not finite)."""
    for t in range(len(counts)):
        counts[t] += np.count_nonzero(kept[t])
    if np.isfinite(magnitudes.sum()):
        return True
    counts += np.count_nonzero(np.isnan(magnitudes), axis=1)  # NaN or inf in the chunk (or an overflow)
    return False


def rank_in_bracket(lo: np.ndarray, hi: np.ndarray, k: int, above: np.ndarray,
                    candidates: Sequence[Sequence[np.ndarray]]) -> Optional[ThresholdBuckets]:
    """The buckets of a bracket ``[lo_t, hi_t)`` once a pass has counted ``above_t`` (entries
    ranking above ``hi_t``, :func:`count_at_least`) and collected every bucket entry; ``None`` if
    some task's k-th largest is not in its bracket (``above_t >= k`` or ``above_t + in_t < k``)."""
    inside = np.asarray([sum(len(x) for x in c) for c in candidates], np.int64)
    rank = k - above
    open_ = lo < hi
    if np.any(open_ & ((rank < 1) | (rank > inside))):
        return None
    return ThresholdBuckets(lo, hi, np.where(open_, rank, 0))


def threshold_buckets(stream: Stream, top_k: float) -> ThresholdBuckets:
    """Exact buckets by a histogram pass: per-task histograms of the float32 bit pattern
    of ``|tau_t|`` (monotone in the value; as :func:`mtl_jax.merging.threshold.kth_largest_abs`),
    ``bits >> 14``, exact int64 counts, then the bucket of the k-th largest,
    ``k = num_kept(N, top_k)``. About 2 ns per entry (``np.bincount``): the fallback of
    :func:`sampled_bracket`."""
    k = kept_count(stream, top_k)
    num = stream.num_tasks
    inf = np.full((num,), np.inf, np.float32)
    if k <= 0:
        return ThresholdBuckets(inf, inf, np.zeros((num,), np.int64))
    hist = np.zeros((num, _NUM_BINS), np.int64)
    ws = Workspace(num, stream.finite)
    staged = np.empty((num, 4 * CHUNK), np.intp)  # bins of several chunks (and small leaves) per bincount
    fill = 0

    def flush():
        for t in range(num):
            hist[t] += np.bincount(staged[t, :fill], minlength=_NUM_BINS)

    for ws.leaf, _, p0, fts in leaf_pass(stream, "ties threshold"):
        for s, e in spans(p0.size):
            if fill + e - s > staged.shape[1]:
                flush()
                fill = 0
            _, tau = ws.task_vectors(p0, fts, s, e)
            bits = tau.view(np.int32)
            np.bitwise_and(bits, 0x7FFFFFFF, out=bits)
            np.right_shift(bits, _HIST_SHIFT, out=staged[:, fill : fill + e - s])
            fill += e - s
    flush()
    bucket, rank = _select_from_top(hist, np.full((num,), k, np.int64))
    lo_bits = bucket.astype(np.int64) << _HIST_SHIFT
    exact = lo_bits >= INF_BITS  # the k-th largest is inf or NaN: the threshold is +inf
    lo = np.where(exact, np.inf, np.minimum(lo_bits, INF_BITS).astype(np.int32).view(np.float32))
    hi_bits = np.minimum(lo_bits + (1 << _HIST_SHIFT), INF_BITS).astype(np.int32)
    hi = np.where(exact, np.inf, hi_bits.view(np.float32))
    return ThresholdBuckets(lo.astype(np.float32), hi.astype(np.float32), rank)


def model_size(stream: Stream) -> int:
    """Entries per model (every leaf)."""
    return sum(stream.pretrained.specs[n].size for n in stream.names)


def kept_count(stream: Stream, top_k: float) -> int:
    """TIES' k for the whole model: ``num_kept(N, top_k)``, at most N."""
    total = model_size(stream)
    return min(num_kept(total, top_k), total)


def _next_prime(n: int) -> int:
    n = max(n, 2)
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def sample_allowance(stream: Stream) -> int:
    """Bytes the TIES sample and the kept-aside positions may use: the memory budget, or the
    working set of the largest leaf when leaves go one at a time."""
    readers = [stream.pretrained] + list(stream.finetuned)
    largest = max(leaf_working_set([r.specs[n] for r in readers], stream.pretrained.specs[n].dtype) for n in stream.names)
    return max(stream.memory_budget or 0, largest)


def _kept_aside_bytes(fraction: float, total: int, num_tasks: int) -> float:
    """Memory of the TIES positions kept aside (index, theta_0, tau) for a fraction of positions."""
    return min(1.0, fraction) * total * (8 + 4 * (num_tasks + 1))


def sampled_bracket(stream: Stream, k: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """A cheap first pass for the exact global TIES threshold: a bracket ``[lo_t, hi_t)`` that holds
    each task's k-th largest |tau_t| with high probability, from a systematic sample.

    The sample is every p-th entry of the concatenated model, p the first prime >= 64 and >=
    N T / ``SAMPLE_ENTRIES`` (a prime does not alias with power-of-two or 3 * 2^j widths); n per
    task. With q = k / N a task's k-th largest ranks about r = q n in its sample, binomial standard
    deviation sqrt(n q (1 - q)); the bracket runs from the sample's ceil(r + z sd)-th to its
    floor(r - z sd)-th largest (``z = SAMPLE_Z``; hi just above it, so ties fall inside).
    Nothing here is trusted: the pass that uses the bracket counts the entries above ``hi_t``
    exactly and checks that the k-th largest lies inside (:func:`rank_in_bracket`); callers fall
    back to :func:`threshold_buckets` when it does not.

    Returns ``(lo, hi)`` fp32 (T,), or ``None`` (use the histogram pass) when the bracket would
    hold more than ``MAX_BAND_FRACTION`` of a task's entries, reaches a non-finite value, or the
    sample or the positions expected to be kept aside would exceed :func:`sample_allowance`
    (checked from n before the sample is read, so small models go straight to the histogram).
    """
    total = model_size(stream)
    num = stream.num_tasks
    allowance = sample_allowance(stream)
    stride = _next_prime(max(64, -(-total * num // SAMPLE_ENTRIES)))
    n, q = -(-total // stride), k / total
    expected_band = 2.0 * SAMPLE_Z * math.sqrt(q * (1.0 - q) / n)  # of each task's entries
    if (8 * num * n > allowance  # the sample and its temporaries
            or expected_band > MAX_BAND_FRACTION or _kept_aside_bytes(num * expected_band, total, num) > allowance):
        return None  # decided before reading anything
    sample = _systematic_sample(stream, stride, n)
    loader = fused_loader()
    fused = loader.ready() if loader is not None else None  # the radix select where numba is loaded
    n = sample.shape[1]
    r, sd = q * n, SAMPLE_Z * math.sqrt(n * q * (1.0 - q))
    i_hi, i_lo = math.floor(r - sd), math.ceil(r + sd)  # ranks from the top, 1-indexed
    if i_hi < 1 or i_lo > n:
        return None
    ranks = np.array([n - i_lo, n - i_hi], np.int64)
    if fused is not None:
        picked = np.empty((num, 2), np.float32)
        fused.order_statistics(np.ascontiguousarray(sample), ranks, picked)
        lo, hi = picked.T
    else:
        lo, hi = np.partition(sample, ranks, axis=1)[:, ranks].T
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        return None
    hi = np.nextafter(hi, np.float32(np.inf))
    band = np.count_nonzero((sample >= lo[:, None]) & (sample < hi[:, None]), axis=1) / n
    if np.any(band > MAX_BAND_FRACTION) or _kept_aside_bytes(float(np.sum(band)), total, num) > allowance:
        return None
    return lo.astype(np.float32), hi.astype(np.float32)


def _systematic_sample(stream: Stream, stride: int, size: int) -> np.ndarray:
    """|tau_t| at every ``stride``-th entry of the concatenated model, fp32 (T, <= size), written
    leaf by leaf into one array (numpy's strided copies, one input at a time)."""
    sample = np.empty((stream.num_tasks, size), np.float32)
    fill, seen = 0, 0
    for _, _, p0, fts in leaf_pass(stream, "ties threshold sample"):
        offset = -seen % stride
        seen += p0.size
        p = p0[offset::stride].astype(np.float32)
        rows = sample[:, fill : fill + p.size]
        for t, f in enumerate(fts):
            np.subtract(f[offset::stride].astype(np.float32), p, out=rows[t])
        np.abs(rows, out=rows)
        fill += p.size
    return sample[:, :fill]


class _BracketKernel:
    """Counts one worker's entries above each ``hi_t`` and keeps those in ``[lo_t, hi_t)``."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray):
        self.lo, self.hi = lo, hi
        self.above = np.zeros(lo.shape, np.int64)
        self.candidates: list[list[np.ndarray]] = [[] for _ in lo]

    def __call__(self, ws, index, p0, fts, out, s, e):
        _, tau = ws.task_vectors(p0, fts, s, e, check=False)
        np.abs(tau, out=tau)
        kept = np.greater_equal(tau, self.hi[:, None], out=ws.mask[:, : e - s])
        if not count_at_least(tau, self.hi, kept, self.above):  # |tau| sums to NaN / inf
            ws.check(p0, fts, s, e)
        for t, x in enumerate(bucket_entries(tau, self.lo, self.hi)):
            self.candidates[t].append(x)


def _bracket_thresholds(stream: Stream, lo: np.ndarray, hi: np.ndarray, k: int) -> Optional[np.ndarray]:
    """Exact thresholds from one pass that counts the entries above each ``hi_t`` and collects
    the bucket entries; ``None`` if a task's k-th largest is outside its bracket."""
    return thresholds_from_workers(chunk_pass(stream, "ties threshold candidates", lambda: _BracketKernel(lo, hi)),
                                   lo, hi, k)


def thresholds_from_workers(kernels: Sequence[Any], lo: np.ndarray, hi: np.ndarray, k: int) -> Optional[np.ndarray]:
    """Exact thresholds from the workers' counts above ``hi_t`` (``kern.above``) and bracket entries
    (``kern.candidates``); ``None`` if a task's k-th largest is outside its bracket."""
    candidates = [[x for kern in kernels for x in kern.candidates[t]] for t in range(len(lo))]
    buckets = rank_in_bracket(lo, hi, k, sum(kern.above for kern in kernels), candidates)
    return None if buckets is None else buckets.threshold(candidates)


def ties_thresholds(stream: Stream, top_k: float) -> np.ndarray:
    """Exact per-task TIES threshold over the whole model: the k-th largest |tau_t| with
    ``k = num_kept(N, top_k)`` (identical to ``kth_largest_abs(stacked_tau, k, batched=True)``).

    A sample pass (:func:`sampled_bracket`, ~1/100 of the entries at 100M parameters) and one
    pass that counts the entries above the bracket and keeps those inside it, then selects the
    exact k-th among them; if the bracket missed (or none was drawn), the histogram pass
    (:func:`threshold_buckets`) and the same counting pass. Returns float32 (T,); +inf where k = 0.
    """
    k = kept_count(stream, top_k)
    if k <= 0:
        return np.full((stream.num_tasks,), np.inf, np.float32)
    bracket = sampled_bracket(stream, k)
    if bracket is not None:
        thr = _bracket_thresholds(stream, *bracket, k)
        if thr is not None:
            return thr
    buckets = threshold_buckets(stream, top_k)
    if np.array_equal(buckets.lo, buckets.hi):
        return buckets.lo
    return _bracket_thresholds(stream, buckets.lo, buckets.hi, k)


def majority_sign(stream: Stream, dyn: dict, hp: tuple) -> float:
    """Model-wide TIES majority ``sign(sum over entries of sign(sum_t trimmed_t))`` (one pass,
    exact integer count) for the sparsification ``hp["trim"]``."""
    total = 0
    for _, out in run_pass(stream, "ties majority sign", "sign_sums", dyn, hp):
        total += sum(int(s) for s in out.values())
    return float(np.sign(total))


def ties_statistics(stream: Stream, trim: str, top_k: float = 0.2, key: Any = None, p: float = 0.0) -> dict:
    """Model-wide statistics of a TIES-style vector as a ``dyn`` dict: thresholds (trim="global",
    2 passes) and the majority sign (1 pass)."""
    dyn: dict[str, Any] = {}
    if trim == "global":
        dyn["thresholds"] = jnp.asarray(ties_thresholds(stream, top_k))
    if trim == "dare":
        dyn["key"] = key
    dyn["majority"] = jnp.float32(majority_sign(stream, dyn, hparams_key(trim=trim, top_k=top_k, p=p)))
    return dyn
