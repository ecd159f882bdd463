"""MergeKit's merge methods, tensor by tensor, as numpy over flat chunks.

Each method follows ``mergekit/merge_methods/`` (0.1.5) operation for operation:

* ``linear`` (Wortsman et al. 2022, model soups): ``sum_i w_i x_i / sum_i w_i`` (``normalize``,
  default true) in float32 (float64 for float64 inputs); every input, the base included, needs a
  ``weight``.
* the generalized task arithmetic family (``task_arithmetic`` Ilharco et al. 2023, ``ties``
  Yadav et al. 2023, ``dare_linear`` / ``dare_ties`` Yu et al. 2024, ``breadcrumbs`` /
  ``breadcrumbs_ties`` Davari & Belilovsky 2024): per non-base input ``d_i = x_i - base``,
  sparsified per tensor (TIES: the ``max(1, int(density * n))`` largest ``|d_i|``; DARE: a
  Bernoulli(``density``) keep mask; breadcrumbs: drop the ``int(gamma * n)`` largest and the
  smallest so that ``int(density * n)`` stay), optionally rescaled so that its L1 norm is the
  unsparsified one (``rescale``, default on for DARE), times ``weight``; TIES-style sign
  consensus (majority sign of ``sum_i w_i d_i``, ties to +; entries whose sign differs, and
  zeros, dropped), sum, divided by the summed weights of the kept entries (``normalize``) and
  scaled by ``lambda``. These run in the working dtype as MergeKit does: with bfloat16 /
  float16 inputs (or ``dtype``) every elementwise result is rounded to it, reductions
  accumulate in float32 and round once (:class:`Precision`).
* ``slerp``: spherical interpolation of the whole flattened tensor between the base and the
  other input (``t``; linear where ``|cos| > 0.9995``), float32.
* ``model_stock`` (Jang et al. 2024): ``t = k cos / (1 + (k - 1) cos)`` from the mean pairwise
  cosine of the offsets ``w_i - w_0`` (per tensor, or per row with ``filter_wise``), result
  ``t mean_i w_i + (1 - t) w_0``; float32 (rounding at the end only).
* ``passthrough``: the single input, times ``scale`` if given.

Speed: elementwise passes run over ``BLOCK``-entry blocks of the ``CHUNK``-entry chunks in reused
buffers, on ``THREADS`` worker threads; bfloat16 rounding is done on the float32 bit patterns
(:meth:`Precision.round_`, equal to the cast); the TIES / breadcrumbs cut of a bfloat16 tensor comes
from counts of |d|'s bit patterns (:meth:`RankWindow.from_bf16_counts`). Results do not depend on
the blocks or threads (``docs/development/merge_speed.md``). With numba installed, ``linear``
and the task arithmetic family without sparsification or consensus run fused output passes
(:mod:`mtl_jax.merging.mergekit.fused`, the same bits; ``MTL_JAX_NUMPY_KERNELS=1`` keeps numpy).

Ties in ``|d|`` at a TIES / breadcrumbs cut are broken by position: of equal values the lower
flat index ranks lower, so a TIES (top-k) cut keeps the later entries; MergeKit's
``torch.argsort`` leaves their order unspecified. DARE masks come from numpy's
PCG64 seeded by (seed, tensor name, input, chunk): the keep fraction and the L1 rescaling are
MergeKit's, the masks differ by design.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import zlib
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

from mtl_jax.errors import UsageError
from mtl_jax.merging.background_import import NUMPY_KERNELS_ENV, background_import

CHUNK = 1 << 20  # entries per chunk: the unit of the DARE keep masks and of the float64 L1 sums
BLOCK = 1 << 16  # entries per block inside a chunk: the working buffers stay in the L2 cache
THREADS = 2  # worker threads of the blocked passes (numpy releases the GIL in its loops)
MISSING = object()
BF16 = np.dtype(ml_dtypes.bfloat16)
NUMPY_DTYPES = {"bfloat16": BF16, "float16": np.dtype(np.float16), "float32": np.dtype(np.float32),
                "float64": np.dtype(np.float64)}


# ----------------------------------------------------------------------------- parameter specs

def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return float(value)  # ints, floats and numeric strings ("1e-3"), as pydantic's lax float


_TRUE, _FALSE = {"true", "yes", "on", "1", "t", "y"}, {"false", "no", "off", "0", "f", "n"}


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError("not a boolean")


@dataclasses.dataclass(frozen=True)
class Param:
    """One method parameter: ``scope`` 'shared' (one value per tensor), 'input' (per input, the
    base included) or 'non_base' (per non-base input); ``default`` MISSING = required."""

    name: str
    kind: str  # 'float' | 'bool' | 'optional_float'
    scope: str
    default: Any = MISSING

    def validate(self, value: Any) -> Any:
        try:
            if self.kind == "bool":
                return _as_bool(value)
            if self.kind == "optional_float" and value is None:
                return None
            return _as_float(value)
        except (TypeError, ValueError):
            raise UsageError(f"parameter {self.name!r}: {value!r} is not a valid {self.kind.replace('_', ' ')}") from None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """``base``: 'required' / 'ignored'; input counts include the base."""

    name: str
    params: tuple[Param, ...]
    base: str
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    consensus: bool = False
    sparsify: Optional[str] = None  # 'magnitude' | 'random' | 'magnitude_outliers'

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)


def _gta(name: str, consensus: bool, sparsify: Optional[str], normalize: bool, rescale: bool) -> MethodSpec:
    params = [Param("int8_mask", "bool", "shared", False), Param("normalize", "bool", "shared", normalize),
              Param("rescale", "bool", "shared", rescale), Param("lambda", "float", "shared", 1.0),
              Param("weight", "float", "non_base"), Param("density", "float", "non_base", 1.0)]
    if sparsify == "magnitude_outliers":
        params.append(Param("gamma", "float", "non_base", 0.01))
    return MethodSpec(name, tuple(params), "required", consensus=consensus, sparsify=sparsify)


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", (Param("weight", "float", "input"), Param("normalize", "bool", "shared", True)), "ignored"),
    "task_arithmetic": _gta("task_arithmetic", False, None, False, False),
    "ties": _gta("ties", True, "magnitude", True, False),
    "dare_ties": _gta("dare_ties", True, "random", False, True),
    "dare_linear": _gta("dare_linear", False, "random", False, True),
    "breadcrumbs": _gta("breadcrumbs", False, "magnitude_outliers", False, False),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", True, "magnitude_outliers", False, False),
    "slerp": MethodSpec("slerp", (Param("t", "float", "shared"),), "required", 2, 2),
    "model_stock": MethodSpec("model_stock", (Param("filter_wise", "bool", "shared", False),), "required", 3),
    "passthrough": MethodSpec("passthrough", (Param("scale", "optional_float", "input", None),), "ignored", 1, 1),
}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UsageError(f"unknown merge_method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# ----------------------------------------------------------------------------- precision

def promoted_dtype(dtypes: list[np.dtype]) -> np.dtype:
    """torch.promote_types over float dtypes (bfloat16 with float16 -> float32)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        if d == out:
            continue
        if {d, out} == {BF16, np.dtype(np.float16)}:
            out = np.dtype(np.float32)
        elif BF16 in (d, out):
            out = out if d == BF16 else d
        else:
            out = np.promote_types(out, d)
    return out


class Precision:
    """Arithmetic of one tensor: ``work`` is MergeKit's working dtype (``dtype`` or the promoted
    input dtype); math runs in ``compute`` (float64 for float64, else float32). ``r(x)`` rounds
    a float32 result to a 16-bit working dtype (identity otherwise), emulating torch
    elementwise ops in that dtype."""

    def __init__(self, work: np.dtype):
        self.work = np.dtype(work)
        self.compute = np.dtype(np.float64) if self.work == np.float64 else np.dtype(np.float32)
        self.half = self.work.itemsize == 2

    def load(self, x: np.ndarray) -> np.ndarray:
        """An input chunk cast to ``work`` (MergeKit casts on load) then to ``compute``."""
        if x.dtype != self.work:
            x = x.astype(self.work)
        return x if x.dtype == self.compute else x.astype(self.compute)

    def r(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.work).astype(self.compute) if self.half else x

    def scalar(self, v: float) -> Any:
        """A python float as a 0-d tensor of the working dtype, in compute precision."""
        return self.compute.type(np.asarray(v, self.compute).astype(self.work))

    def load_into(self, x: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """:meth:`load` of a block into ``out`` (compute dtype, ``len(x)`` entries); a float32 input
        in float32 work is returned as is (read-only). bfloat16 -> float32 is a 16-bit shift of the
        bit pattern (exact, as the cast); float32 -> bfloat16 work is :meth:`round_` of a copy."""
        if x.dtype == self.work == self.compute:
            return x
        if x.dtype == BF16 and self.work == BF16:
            np.left_shift(x.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
            return out
        if x.dtype == np.float32 and self.work == BF16:
            np.copyto(out, x)
            return self.round_(out, scratch)
        np.copyto(out, x if x.dtype == self.work else x.astype(self.work), casting="unsafe")
        return out

    def round_(self, x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """:meth:`r` in place (``scratch``: uint32, ``len(x)`` entries). bfloat16: round to nearest
        even on the float32 bit pattern (``bits + 0x7FFF + lsb``, low half cleared; equal to the
        cast for every non-NaN float32, checked over all 2**32 patterns); a block holding a NaN
        uses the cast."""
        if not self.half or not x.size:
            return x
        if self.work != BF16 or np.isnan(np.max(x)):
            np.copyto(x, x.astype(self.work), casting="unsafe")
            return x
        bits, lsb = x.view(np.uint32), scratch[: x.size]
        np.right_shift(bits, 16, out=lsb)
        np.bitwise_and(lsb, 1, out=lsb)
        np.add(bits, 0x7FFF, out=bits)
        np.add(bits, lsb, out=bits)
        np.bitwise_and(bits, 0xFFFF0000, out=bits)
        return x

    def store(self, value: np.ndarray, out: np.ndarray, scratch: np.ndarray, rounded: bool) -> None:
        """``out[...] = value.astype(work)`` (then numpy's cast to ``out``'s dtype); ``rounded``:
        ``value`` already holds working-dtype values (:meth:`round_`), so a bfloat16 output takes
        the high halves of the bit patterns (exact)."""
        if self.work == BF16 and out.dtype == BF16:
            if not rounded:
                value = self.round_(value, scratch)
            np.right_shift(value.view(np.uint32), 16, out=out.view(np.uint16), casting="unsafe")
        elif self.half:
            out[...] = value if rounded and out.dtype == self.compute else value.astype(self.work)
        else:
            out[...] = value


def spans(n: int, size: int = CHUNK):
    for s in range(0, n, size):
        yield s, min(n, s + size)


class Buffers:
    """Reusable block buffers of one worker: ``f[k]`` compute-dtype (BLOCK,), ``u`` uint32 scratch,
    ``b[k]`` bool (BLOCK,)."""

    def __init__(self, compute: np.dtype, num_float: int, num_bool: int = 2):
        self.f = [np.empty(BLOCK, compute) for _ in range(num_float)]
        self.u = np.empty(BLOCK, np.uint32)
        self.b = [np.empty(BLOCK, np.bool_) for _ in range(num_bool)]


_POOL: list = []

# Seconds per phase ("stats": the sparsification statistics passes, "output": the output passes;
# run.py adds "write_wait"), accumulated only while this is a dict (benchmarks/merge_throughput.py).
PHASE_SECONDS: Optional[dict] = None


@contextlib.contextmanager
def phase(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        if PHASE_SECONDS is not None:
            PHASE_SECONDS[name] = PHASE_SECONDS.get(name, 0.0) + time.perf_counter() - start


def _pool():
    import concurrent.futures

    if not _POOL:
        _POOL.append(concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="mergekit-block"))
    return _POOL[0]


FUSED_METHODS = ("linear", "task_arithmetic")  # fused output passes (also dare_linear / breadcrumbs at density 1)


def fused_kernels(wait: bool = False) -> Optional[Any]:
    """The fused kernels (:mod:`mtl_jax.merging.mergekit.fused`) once loaded, else None: numba
    not installed, ``MTL_JAX_NUMPY_KERNELS=1``, or (unless ``wait``) still loading in the
    background thread this call starts (:mod:`mtl_jax.merging.background_import`)."""
    loader = background_import("mtl_jax.merging.mergekit.fused")
    if loader is None:
        return None
    return loader.wait() if wait else loader.ready()


def _fused_view(x: np.ndarray) -> np.ndarray:
    """A flat bfloat16 / float32 array as the fused kernels take it (bfloat16: uint16 bit patterns)."""
    return x.view(np.uint16) if x.dtype == BF16 else x


def _fusable(prec: Precision, inputs: list[np.ndarray], out: np.ndarray) -> bool:
    """Whether the fused kernels cover these dtypes: bfloat16 / float32 work, inputs and output,
    the inputs after the first of one dtype (a numba tuple)."""
    kinds = (BF16, np.dtype(np.float32))
    return (prec.work in kinds and out.dtype in kinds and all(x.dtype in kinds for x in inputs)
            and len({x.dtype for x in inputs[1:]}) <= 1)


def _fused_chunk(kernel: Callable, s: int, e: int, numpy_block: Callable, bufs: "Buffers", fk: Any) -> None:
    """Run ``kernel(flags)`` (a fused kernel bound to chunk ``[s, e)``), then ``numpy_block(lo, hi,
    bufs)`` over the kernel blocks it flags (a NaN in the result: numpy gives the cast's NaN)."""
    flags = np.empty(fk.num_blocks(e - s), np.bool_)
    kernel(flags)
    for blk in np.flatnonzero(flags):
        lo = s + int(blk) * fk.BLOCK
        numpy_block(lo, min(e, lo + fk.BLOCK), bufs)


def run_chunks(n: int, work: Callable[[int, int, int, Buffers], Any], make_buffers: Callable[[], Buffers],
               parallel: bool = True) -> list:
    """``work(c, s, e, bufs)`` for every chunk ``c = [s, e)`` of ``range(n)``, on ``THREADS``
    workers (contiguous runs of chunks; each worker its own :class:`Buffers`) or in order on the
    caller's thread (``parallel=False``, or a single chunk). Returns the results in chunk order."""
    chunks = list(spans(n))
    if not parallel or THREADS < 2 or len(chunks) < 2:
        bufs = make_buffers()
        return [work(c, s, e, bufs) for c, (s, e) in enumerate(chunks)]
    k = min(THREADS, len(chunks))
    runs = [list(range(j * len(chunks) // k, (j + 1) * len(chunks) // k)) for j in range(k)]

    def run(idx):
        bufs = make_buffers()
        return [work(c, *chunks[c], bufs) for c in idx]

    futures = [_pool().submit(run, idx) for idx in runs]
    return [r for f in futures for r in f.result()]


# ----------------------------------------------------------------------------- sparsification

class RankWindow:
    """Keep-mask of the entries whose ascending rank of ``a`` (ties by position) lies in
    ``[lo, hi)``, applied chunk by chunk in order (:meth:`__call__`). Built from one
    ``np.partition`` of ``a`` (destroyed); also gives ``kept_sum`` (sum of the kept values) and
    ``total_sum``. NaN ranks above every number, as in ``torch.sort``; NaN entries are never in
    the mask (the masked product keeps them NaN), the numbers keep their ranks."""

    def __init__(self, a: np.ndarray, lo: int, hi: int):
        n = a.size
        self.total_sum = float(np.sum(a, dtype=np.float64))
        if math.isnan(self.total_sum):  # NaN ranks above every number (torch.sort); NaN * mask is NaN either way
            hi = min(hi, n - int(np.count_nonzero(np.isnan(a))))
        self.empty, self.all = hi <= lo, lo <= 0 and hi >= n
        if self.empty:
            self.kept_sum = 0.0
            return
        if self.all:
            self.kept_sum = self.total_sum
            return
        a.partition(sorted({lo, hi - 1}))
        self.vlo, self.vhi = a[lo], a[hi - 1]
        self.kept_sum = float(np.sum(a[lo:hi], dtype=np.float64))
        # occurrence windows [jlo, jhi) inside the groups of entries equal to vlo / vhi
        below_lo, eq_lo = int(np.count_nonzero(a < self.vlo)), int(np.count_nonzero(a == self.vlo))
        below_hi = int(np.count_nonzero(a < self.vhi)) if self.vlo != self.vhi else below_lo
        self._set_groups(lo, hi, below_lo, eq_lo, below_hi)

    def _set_groups(self, lo: int, hi: int, below_lo: int, eq_lo: int, below_hi: int) -> None:
        if self.vlo == self.vhi:
            self.groups = {float(self.vlo): [lo - below_lo, hi - below_lo, 0]}
        else:
            self.groups = {float(self.vlo): [lo - below_lo, eq_lo, 0], float(self.vhi): [0, hi - below_hi, 0]}

    @classmethod
    def from_bf16_counts(cls, chunk_counts: list, lo: int, hi: int) -> "RankWindow":
        """The same window from ``counts[v]``, the number of entries whose value has the bfloat16
        bit pattern ``v`` (non-negative, finite or inf, no NaN; 65536 bins): the ascending order
        of such values is the order of their patterns, so the cut values and the counts below
        them are read off the cumulative counts (no partition, no copy of the entries).
        ``chunk_counts``: those counts per CHUNK of the entries, in order; they also give
        :attr:`chunk_seen`, so that chunks may be masked in any order. ``kept_sum`` /
        ``total_sum`` are not available (None)."""
        self = cls.__new__(cls)
        counts = np.sum(chunk_counts, axis=0)
        n = int(counts.sum())
        self.empty, self.all = hi <= lo, lo <= 0 and hi >= n
        self.total_sum = self.kept_sum = None
        if self.empty or self.all:
            self.chunk_seen = [{} for _ in chunk_counts]
            return self
        upto = np.cumsum(counts)  # upto[v]: entries with pattern <= v
        vlo, vhi = (int(np.searchsorted(upto, r, side="right")) for r in (lo, hi - 1))
        as_f32 = lambda v: np.array([v << 16], np.uint32).view(np.float32)[0]
        self.vlo, self.vhi = as_f32(vlo), as_f32(vhi)
        below = lambda v: int(upto[v - 1]) if v else 0
        self._set_groups(lo, hi, below(vlo), int(counts[vlo]), below(vhi))
        self.chunk_seen, seen = [], {float(self.vlo): 0, float(self.vhi): 0}
        for c in chunk_counts:
            self.chunk_seen.append(dict(seen))
            seen = {float(self.vlo): seen[float(self.vlo)] + int(c[vlo]), float(self.vhi): seen[float(self.vhi)] + int(c[vhi])}
        return self

    def __call__(self, x: np.ndarray, seen: Optional[dict] = None) -> np.ndarray:
        """Keep-mask of the next entries ``x``. ``seen``: ``{cut value: entries equal to it before
        x}`` (updated), for callers that start at a known position (:attr:`chunk_seen`); default:
        the window's own count, for calls in order from the first entry."""
        if self.empty:
            return np.zeros(x.shape, bool)
        if self.all:
            return np.ones(x.shape, bool)
        keep = (x > self.vlo) & (x < self.vhi)
        for v, g in self.groups.items():
            idx = np.flatnonzero(x == v)
            if idx.size:
                before = g[2] if seen is None else seen[v]
                j = before + np.arange(idx.size)
                keep[idx[(j >= g[0]) & (j < g[1])]] = True
                if seen is None:
                    g[2] += idx.size
                else:
                    seen[v] += idx.size
        return keep

    chunk_seen: Optional[list] = None  # per CHUNK of the entries: {cut value: equal entries before it}


def dare_keep(seed: int, name: str, input_index: int, chunk: int, size: int, density: float) -> np.ndarray:
    """Bernoulli(``density``) keep mask of one chunk, a function of (seed, tensor, input, chunk)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), input_index, chunk])
    return rng.random(size, dtype=np.float32) < np.float32(density)


@dataclasses.dataclass
class Sparsifier:
    """How one non-base input's delta is sparsified in the output pass: ``random(chunk, size)``
    (a chunk's keep mask) or ``window`` (:class:`RankWindow` over ``|d|``, called block by block
    in order); neither: keep all. ``zero`` (drop everything), ``scale`` (L1 rescale factor or None)."""

    random: Optional[Callable[[int, int], np.ndarray]] = None
    window: Optional[RankWindow] = None
    zero: bool = False
    scale: Optional[float] = None


def _l1_scale(prec: Precision, before: float, after: float) -> Optional[float]:
    """MergeKit's ``rescaled_masked_tensor`` factor: ``before / after`` (both rounded to the
    working dtype), None where either is below 1e-7."""
    b, a = prec.scalar(before), prec.scalar(after)
    if b < 1e-7 or a < 1e-7:
        return None
    return prec.scalar(b / a)


# ----------------------------------------------------------------------------- the methods

@dataclasses.dataclass
class TensorJob:
    """One output tensor: flat inputs (pretrained first if ``base`` is set: index of the base
    among ``inputs``), resolved parameters, where the result goes (``out``, flat)."""

    name: str
    inputs: list[np.ndarray]
    base: Optional[int]
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    prec: Precision
    out: np.ndarray
    shape: tuple[int, ...] = ()
    seed: int = 0


def merge_tensor(spec: MethodSpec, job: TensorJob) -> None:
    """Fill ``job.out`` with the merge of ``job.inputs`` by ``spec``."""
    if spec.name == "linear":
        return _linear(job)
    if spec.name == "passthrough":
        return _passthrough(job)
    if spec.name == "slerp":
        return _slerp(job)
    if spec.name == "model_stock":
        return _model_stock(job)
    return _gta(spec, job)


def _store(job: TensorJob, s: int, e: int, value: np.ndarray) -> None:
    v = value.astype(job.prec.work, copy=False) if job.prec.half else value
    job.out[s:e] = v  # numpy casts to the output dtype


def _linear(job: TensorJob) -> None:
    """``sum_i w_i x_i`` (``/ sum_i w_i``) accumulated in compute precision from 0, one rounding
    to the working dtype at the end (MergeKit's ``linear``), block by block; fused
    (:func:`mtl_jax.merging.mergekit.fused.linear_chunk`) for bfloat16 / float32."""
    prec = job.prec
    w = np.asarray([p["weight"] for p in job.per_input], prec.compute)
    denom = np.sum(w) if job.shared["normalize"] else None
    fusable = _fusable(prec, [job.inputs[0]] + job.inputs, job.out)

    def numpy_block(lo, hi, bufs):
        acc, x, t = bufs.f
        m = hi - lo
        for j, (inp, wi) in enumerate(zip(job.inputs, w)):
            v = prec.load_into(inp[lo:hi], x[:m], bufs.u)
            if j == 0:
                np.multiply(v, wi, out=t[:m])
                np.add(t[:m], 0, out=acc[:m])  # 0 + x_0 w_0, as the zero-initialised sum
            else:
                np.multiply(v, wi, out=t[:m])
                acc[:m] += t[:m]
        if denom is not None:
            acc[:m] /= denom
        prec.store(acc[:m], job.out[lo:hi], bufs.u, rounded=False)

    def work(c, s, e, bufs):
        fk = fused_kernels() if fusable else None
        if fk is not None:
            xs = tuple(_fused_view(x[s:e]) for x in job.inputs)
            kernel = lambda flags: fk.linear_chunk(xs, w, np.float32(denom if denom is not None else 1), denom is not None,
                                                   prec.half, _fused_view(job.out[s:e]), flags)
            return _fused_chunk(kernel, s, e, numpy_block, bufs, fk)
        for bs, be in spans(e - s, BLOCK):
            numpy_block(s + bs, s + be, bufs)

    with phase("output"):
        run_chunks(job.out.size, work, lambda: Buffers(prec.compute, 3))


def _passthrough(job: TensorJob) -> None:
    scale = job.per_input[0]["scale"]
    for s, e in spans(job.out.size):
        x = job.prec.load(job.inputs[0][s:e])
        _store(job, s, e, x if scale is None else job.prec.r(x * scale))


def _delta_block(prec: Precision, x: np.ndarray, base: np.ndarray, out: np.ndarray, bufs: Buffers) -> np.ndarray:
    """``r(load(x) - load(base))`` of one block into ``out``."""
    m = len(x)
    b = prec.load_into(base, bufs.f[-1][:m], bufs.u)
    v = prec.load_into(x, out, bufs.u)
    np.subtract(v, b, out=out)
    return prec.round_(out, bufs.u)


def _sparsifier(spec: MethodSpec, job: TensorJob, i: int, params: dict[str, Any], rescale: bool) -> Sparsifier:
    """Statistics pass of input ``i``'s delta for its sparsification (see :class:`Sparsifier`)."""
    prec, n = job.prec, job.out.size
    density = params["density"]
    if spec.sparsify is None or density >= 1:
        return Sparsifier()
    base, x = job.inputs[job.base], job.inputs[i]
    if spec.sparsify == "random":
        keep = lambda c, size: dare_keep(job.seed, job.name, i, c, size, density)

        def sums(c, s, e, bufs):  # float64 sums over each chunk (the unit of the keep masks)
            d = bufs.chunk[: e - s]
            for bs, be in spans(e - s, BLOCK):
                np.abs(_delta_block(prec, x[s + bs : s + be], base[s + bs : s + be], d[bs:be], bufs), out=d[bs:be])
            return float(np.sum(d, dtype=np.float64)), float(np.sum(d[keep(c, e - s)], dtype=np.float64))

        def chunk_buffers():
            bufs = Buffers(prec.compute, 1)
            bufs.chunk = np.empty(min(CHUNK, n), prec.compute)
            return bufs

        before = after = 0.0
        for b_, a_ in run_chunks(n, sums, chunk_buffers):
            before += b_
            after += a_
        # MergeKit's ``bernoulli`` rescales a float16 delta in float32 (CPU), a bfloat16 one in bfloat16
        scale_prec = Precision(np.float32) if prec.work == np.float16 else prec
        return Sparsifier(random=keep, scale=_l1_scale(scale_prec, before, after) if rescale else None)
    if spec.sparsify == "magnitude":
        if density <= 0 or n == 0:
            return Sparsifier(zero=True)
        k = max(1, int(density * n))
        lo, hi = n - k, n
    else:  # magnitude_outliers
        target, top = int(density * n), int(params["gamma"] * n)
        lo = max(0, n - target - top)
        hi = lo + target
    if n and not rescale and prec.work == BF16:  # |d| is a bfloat16 value: count its patterns
        def count(c, s, e, bufs):
            pattern = bufs.chunk[: e - s]
            for bs, be in spans(e - s, BLOCK):
                d = _delta_block(prec, x[s + bs : s + be], base[s + bs : s + be], bufs.f[0][: be - bs], bufs)
                np.abs(d, out=d)
                np.right_shift(d.view(np.uint32), 16, out=pattern[bs:be], casting="unsafe")
            return np.bincount(pattern, minlength=1 << 16)

        def chunk_buffers():
            bufs = Buffers(prec.compute, 2)
            bufs.chunk = np.empty(min(CHUNK, n), np.uint16)
            return bufs

        chunk_counts = run_chunks(n, count, chunk_buffers)
        if not any(c[0x7F81:].any() for c in chunk_counts):  # no NaN (ranks above inf, never compares equal)
            return Sparsifier(window=RankWindow.from_bf16_counts(chunk_counts, lo, hi))
    a = np.empty(n, np.float32)

    def fill(c, s, e, bufs):
        for bs, be in spans(e - s, BLOCK):
            d = _delta_block(prec, x[s + bs : s + be], base[s + bs : s + be], bufs.f[0][: be - bs], bufs)
            np.abs(d, out=a[s + bs : s + be])

    run_chunks(n, fill, lambda: Buffers(prec.compute, 2))
    window = RankWindow(a, lo, hi)  # partitions (destroys) a; keeps only its cut values
    scale = _l1_scale(prec, window.total_sum, window.kept_sum) if rescale else None
    return Sparsifier(window=window, scale=scale)


def _gta(spec: MethodSpec, job: TensorJob) -> None:
    """The generalized task arithmetic family (see the module docstring), block by block; every
    elementwise result rounded to the working dtype (:meth:`Precision.round_`)."""
    prec = job.prec
    others = [i for i in range(len(job.inputs)) if i != job.base]
    base = job.inputs[job.base]
    if not others:
        for s, e in spans(job.out.size):
            _store(job, s, e, prec.load(base[s:e]))
        return
    rescale = job.shared["rescale"]
    with phase("stats"):
        sparse = {i: _sparsifier(spec, job, i, job.per_input[i], rescale) for i in others}
    w = {i: prec.scalar(job.per_input[i]["weight"]) for i in others}
    lam, normalize = job.shared["lambda"], job.shared["normalize"]
    lam_c = prec.compute.type(lam)
    wsum = prec.scalar(sum(w.values())) if not spec.consensus else None
    if wsum is not None and abs(wsum) < 1e-8:
        wsum = 1.0
    k = len(others)
    in_order = any(sparse[i].window is not None and sparse[i].window.chunk_seen is None for i in others)

    plain = not spec.consensus and all(sparse[i] == Sparsifier() for i in others)
    fusable = plain and _fusable(prec, [base] + [job.inputs[i] for i in others], job.out)
    w_fused = np.asarray([w[i] for i in others], np.float32)

    def work(c, s, e, bufs):
        chunk_keep = {i: sparse[i].random(c, e - s) for i in others if sparse[i].random is not None}
        seen = {i: dict(sparse[i].window.chunk_seen[c]) for i in others
                if sparse[i].window is not None and sparse[i].window.chunk_seen is not None}
        block = lambda lo, hi, bufs: numpy_block(lo, hi, s, bufs, chunk_keep, seen)
        fk = fused_kernels() if fusable else None
        if fk is not None:
            xs = tuple(_fused_view(job.inputs[i][s:e]) for i in others)
            kernel = lambda flags: fk.task_arithmetic_chunk(
                _fused_view(base[s:e]), xs, w_fused, np.float32(wsum), lam_c, normalize, lam != 1, prec.half,
                _fused_view(job.out[s:e]), flags)
            return _fused_chunk(kernel, s, e, block, bufs, fk)
        for bs, be in spans(e - s, BLOCK):
            block(s + bs, s + be, bufs)

    def numpy_block(lo, hi, s, bufs, chunk_keep, seen):
        """Entries ``[lo, hi)`` (inside the chunk starting at ``s``)."""
        deltas, (mixed, divisor, tmp, signs, majority, bb) = bufs.f[:k], bufs.f[k:]
        keep_buf, eq = bufs.b
        m, bs, be = hi - lo, lo - s, hi - s
        b = prec.load_into(base[lo:hi], bb[:m], bufs.u)
        for j, i in enumerate(others):
            d = deltas[j][:m]
            v = prec.load_into(job.inputs[i][lo:hi], d, bufs.u)
            np.subtract(v, b, out=d)
            prec.round_(d, bufs.u)
            sp = sparse[i]
            if sp.zero:
                d.fill(0)
            elif sp.random is not None or sp.window is not None:
                if sp.window is not None:
                    absd = np.abs(d, out=tmp[:m]) if prec.compute == np.float32 else np.abs(d).astype(np.float32)
                    mask = sp.window(absd, seen.get(i))
                else:
                    mask = chunk_keep[i][bs:be]
                np.multiply(d, mask, out=d)
                if sp.scale is not None:
                    np.multiply(d, sp.scale, out=d)
                    prec.round_(d, bufs.u)
            np.multiply(d, w[i], out=d)
            prec.round_(d, bufs.u)
        mix = mixed[:m]
        if spec.consensus:
            _sum_in_order([x[:m] for x in deltas], mix)
            prec.round_(mix, bufs.u)
            maj = majority[:m]
            np.greater_equal(mix, 0, out=keep_buf[:m])
            np.multiply(keep_buf[:m], 2, out=maj, casting="unsafe")
            maj -= 1  # +1 where the summed delta is >= 0, else -1 (MergeKit: ties go to +)
            div, t, kb = divisor[:m], tmp[:m], keep_buf[:m]
            for j, i in enumerate(others):
                d = deltas[j][:m]
                np.sign(d, out=signs[:m])
                np.equal(signs[:m], maj, out=kb)
                np.multiply(d, kb, out=t)  # d * keep (NaN stays NaN, as the torch product)
                if j == 0:
                    np.add(t, 0, out=mix)  # 0 + ..., as the zero-initialised sums
                else:
                    mix += t
                np.multiply(kb, w[i], out=t)
                if j == 0:
                    np.add(t, 0, out=div)
                else:
                    div += t
            prec.round_(mix, bufs.u)
            prec.round_(div, bufs.u)
            np.equal(div, 0, out=eq[:m])
            div[eq[:m]] = 1
            den = div
        else:
            _sum_in_order([x[:m] for x in deltas], mix)
            prec.round_(mix, bufs.u)
            den = wsum
        if normalize:
            np.divide(mix, den, out=mix)
            prec.round_(mix, bufs.u)
        if lam != 1:
            np.multiply(mix, lam_c, out=mix)
            prec.round_(mix, bufs.u)
        np.add(b, mix, out=mix)
        prec.round_(mix, bufs.u)
        prec.store(mix, job.out[lo:hi], bufs.u, rounded=True)

    # a RankWindow without per-chunk counts resolves ties at its cut in order: chunks in order
    with phase("output"):
        run_chunks(job.out.size, work, lambda: Buffers(prec.compute, k + 6), parallel=not in_order)


def _sum_in_order(xs: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """``np.sum(xs, axis=0)`` into ``out``: 0 + the first row, then each next one added in order
    (numpy's reduction starts from its identity, so all -0.0 rows sum to +0.0)."""
    np.add(xs[0], 0, out=out)
    for x in xs[1:]:
        out += x
    return out


def _slerp(job: TensorJob, dot_threshold: float = 0.9995, eps: float = 1e-8) -> None:
    prec = job.prec
    dt = prec.compute
    v0, v1 = job.inputs[job.base], job.inputs[1 - job.base]
    t = dt.type(job.shared["t"])
    n = job.out.size
    if n == 0:
        return
    na2 = nb2 = 0.0
    for s, e in spans(n):
        x, y = prec.load(v0[s:e]), prec.load(v1[s:e])
        na2 += float(np.dot(x, x))
        nb2 += float(np.dot(y, y))
    na, nb = dt.type(math.sqrt(na2)), dt.type(math.sqrt(nb2))
    na, nb = (na if na > eps else dt.type(1)), (nb if nb > eps else dt.type(1))
    dot = 0.0
    for s, e in spans(n):
        dot += float(np.dot(prec.load(v0[s:e]) / na, prec.load(v1[s:e]) / nb))
    dot = dt.type(min(1.0, max(-1.0, dot)))
    if abs(dot) > dot_threshold:
        ca, cb = dt.type(1) - t, t
    else:
        theta = np.arccos(dot)
        sin_theta = np.sin(theta)
        ca, cb = np.sin((dt.type(1) - t) * theta) / sin_theta, np.sin(t * theta) / sin_theta
    for s, e in spans(n):
        job.out[s:e] = (ca * prec.load(v0[s:e]) + cb * prec.load(v1[s:e])).astype(prec.work)


def _stock_t(cos: np.ndarray, count: int) -> np.ndarray:
    den = 1 + (count - 1) * cos
    singular = np.abs(den) < 1e-6
    return np.where(singular, 0.0, count * cos / np.where(singular, 1.0, den))


def _model_stock(job: TensorJob) -> None:
    prec = job.prec
    w0 = job.inputs[job.base]
    ws = [x for i, x in enumerate(job.inputs) if i != job.base]
    count, shape = len(ws), job.shape
    if job.shared["filter_wise"]:
        width = shape[-1] if shape else 1  # rows along the last axis; a 1-D tensor is one row
        base = prec.load(w0).reshape(-1, width)
        offs = [prec.load(x).reshape(-1, width) - base for x in ws]
        norms = [np.linalg.norm(o, axis=-1) for o in offs]
        cos = [np.clip(np.sum(offs[a] * offs[b], axis=-1) / np.maximum(norms[a] * norms[b], 1e-6), -1, 1)
               for a in range(count) for b in range(a + 1, count)]
        t = _stock_t(np.mean(cos, axis=0), count)[:, None].astype(prec.compute)
        avg = sum(prec.load(x).reshape(-1, width) for x in ws) / count
        job.out[...] = (t * avg + (1 - t) * base).reshape(-1).astype(prec.work)
        return
    n = job.out.size
    sq = np.zeros(count)
    dots = np.zeros((count, count))
    for s, e in spans(n):
        b = prec.load(w0[s:e])
        offs = np.stack([prec.load(x[s:e]) - b for x in ws])
        gram = offs @ offs.T
        dots += gram
        sq += np.diag(gram)
    norms = np.sqrt(sq)
    cos = [np.clip(dots[a, b] / max(norms[a] * norms[b], 1e-6), -1, 1) for a in range(count) for b in range(a + 1, count)]
    t = prec.compute.type(_stock_t(np.asarray(np.mean(cos)), count))
    for s, e in spans(n):
        b = prec.load(w0[s:e])
        avg = sum(prec.load(x[s:e]) for x in ws) / prec.compute.type(count)
        job.out[s:e] = (t * avg + (1 - t) * b).astype(prec.work)


__all__ = ["BLOCK", "CHUNK", "FUSED_METHODS", "METHODS", "MethodSpec", "NUMPY_DTYPES", "NUMPY_KERNELS_ENV", "Param", "Precision",
           "RankWindow", "TensorJob", "dare_keep", "fused_kernels", "merge_tensor", "method_spec", "promoted_dtype"]
