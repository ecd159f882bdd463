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

Ties in ``|d|`` at a TIES / breadcrumbs cut are broken by position (lower flat index first);
MergeKit's ``torch.argsort`` leaves their order unspecified. DARE masks come from numpy's
PCG64 seeded by (seed, tensor name, input, chunk): the keep fraction and the L1 rescaling are
MergeKit's, the masks differ by design.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Optional

import ml_dtypes
import numpy as np

from mtl_jax.errors import UsageError

CHUNK = 1 << 20  # entries per chunk of the elementwise passes
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


def spans(n: int):
    for s in range(0, n, CHUNK):
        yield s, min(n, s + CHUNK)


# ----------------------------------------------------------------------------- sparsification

class RankWindow:
    """Keep-mask of the entries whose ascending rank of ``a`` (ties by position) lies in
    ``[lo, hi)``, applied chunk by chunk in order (:meth:`__call__`). Built from one
    ``np.partition`` of ``a`` (destroyed); also gives ``kept_sum`` (sum of the kept values) and
    ``total_sum``."""

    def __init__(self, a: np.ndarray, lo: int, hi: int):
        n = a.size
        self.empty, self.all = hi <= lo, lo <= 0 and hi >= n
        self.total_sum = float(np.sum(a, dtype=np.float64))
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
        if self.vlo == self.vhi:
            self.groups = {float(self.vlo): [lo - below_lo, hi - below_lo, 0]}
        else:
            below_hi = int(np.count_nonzero(a < self.vhi))
            self.groups = {float(self.vlo): [lo - below_lo, eq_lo, 0], float(self.vhi): [0, hi - below_hi, 0]}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.empty:
            return np.zeros(x.shape, bool)
        if self.all:
            return np.ones(x.shape, bool)
        keep = (x > self.vlo) & (x < self.vhi)
        for v, g in self.groups.items():
            idx = np.flatnonzero(x == v)
            if idx.size:
                j = g[2] + np.arange(idx.size)
                keep[idx[(j >= g[0]) & (j < g[1])]] = True
                g[2] += idx.size
        return keep


def dare_keep(seed: int, name: str, input_index: int, chunk: int, size: int, density: float) -> np.ndarray:
    """Bernoulli(``density``) keep mask of one chunk, a function of (seed, tensor, input, chunk)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), input_index, chunk])
    return rng.random(size, dtype=np.float32) < np.float32(density)


@dataclasses.dataclass
class Sparsifier:
    """How one non-base input's delta is sparsified in the output pass: ``mask(i_chunk, absd)``
    (None: keep all), ``zero`` (drop everything), ``scale`` (L1 rescale factor or None)."""

    mask: Optional[Callable[[int, np.ndarray], np.ndarray]] = None
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
    prec = job.prec
    w = np.asarray([p["weight"] for p in job.per_input], prec.compute)
    denom = np.sum(w) if job.shared["normalize"] else None
    for s, e in spans(job.out.size):
        acc = np.zeros(e - s, prec.compute)
        for x, wi in zip(job.inputs, w):
            acc += prec.load(x[s:e]) * wi
        if denom is not None:
            acc /= denom
        job.out[s:e] = acc.astype(prec.work)


def _passthrough(job: TensorJob) -> None:
    scale = job.per_input[0]["scale"]
    for s, e in spans(job.out.size):
        x = job.prec.load(job.inputs[0][s:e])
        _store(job, s, e, x if scale is None else job.prec.r(x * scale))


def _sparsifier(spec: MethodSpec, job: TensorJob, i: int, params: dict[str, Any], rescale: bool) -> Sparsifier:
    """Statistics pass of input ``i``'s delta for its sparsification (see :class:`Sparsifier`)."""
    prec, n = job.prec, job.out.size
    density = params["density"]
    if spec.sparsify is None or density >= 1:
        return Sparsifier()
    base, x = job.inputs[job.base], job.inputs[i]
    if spec.sparsify == "random":
        before = after = 0.0
        for c, (s, e) in enumerate(spans(n)):
            d = np.abs(prec.r(prec.load(x[s:e]) - prec.load(base[s:e])))
            before += float(np.sum(d, dtype=np.float64))
            after += float(np.sum(d[dare_keep(job.seed, job.name, i, c, e - s, density)], dtype=np.float64))
        mask = lambda c, absd: dare_keep(job.seed, job.name, i, c, absd.size, density)
        return Sparsifier(mask, scale=_l1_scale(prec, before, after) if rescale else None)
    if spec.sparsify == "magnitude":
        if density <= 0 or n == 0:
            return Sparsifier(zero=True)
        k = max(1, int(density * n))
        lo, hi = n - k, n
    else:  # magnitude_outliers
        target, top = int(density * n), int(params["gamma"] * n)
        lo = max(0, n - target - top)
        hi = lo + target
    a = np.empty(n, np.float32)
    for s, e in spans(n):
        a[s:e] = np.abs(prec.r(prec.load(x[s:e]) - prec.load(base[s:e])))
    window = RankWindow(a, lo, hi)
    del a
    scale = _l1_scale(prec, window.total_sum, window.kept_sum) if rescale else None
    return Sparsifier(lambda c, absd: window(absd), scale=scale)


def _gta(spec: MethodSpec, job: TensorJob) -> None:
    prec = job.prec
    others = [i for i in range(len(job.inputs)) if i != job.base]
    base = job.inputs[job.base]
    if not others:
        for s, e in spans(job.out.size):
            _store(job, s, e, prec.load(base[s:e]))
        return
    rescale = job.shared["rescale"]
    sparse = {i: _sparsifier(spec, job, i, job.per_input[i], rescale) for i in others}
    w = {i: prec.scalar(job.per_input[i]["weight"]) for i in others}
    lam, normalize = job.shared["lambda"], job.shared["normalize"]
    wsum = prec.scalar(sum(w.values())) if not spec.consensus else None
    if wsum is not None and abs(wsum) < 1e-8:
        wsum = 1.0
    for c, (s, e) in enumerate(spans(job.out.size)):
        b = prec.load(base[s:e])
        deltas = []
        for i in others:
            d = prec.r(prec.load(job.inputs[i][s:e]) - b)
            sp = sparse[i]
            if sp.zero:
                d = np.zeros_like(d)
            elif sp.mask is not None:
                d = d * sp.mask(c, np.abs(d).astype(np.float32, copy=False))
                if sp.scale is not None:
                    d = prec.r(d * sp.scale)
            deltas.append(prec.r(d * w[i]))
        if spec.consensus:
            majority = np.where(prec.r(np.sum(deltas, axis=0)) >= 0, 1.0, -1.0).astype(prec.compute)
            mixed = np.zeros_like(b)
            divisor = np.zeros_like(b)
            for i, d in zip(others, deltas):
                keep = np.sign(d) == majority
                mixed += d * keep
                divisor += w[i] * keep
            mixed, divisor = prec.r(mixed), prec.r(divisor)
            divisor[divisor == 0] = 1
        else:
            mixed = prec.r(np.sum(deltas, axis=0))
            divisor = wsum
        if normalize:
            mixed = prec.r(mixed / divisor)
        if lam != 1:
            mixed = prec.r(mixed * lam)
        _store(job, s, e, prec.r(b + mixed))


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


__all__ = ["CHUNK", "METHODS", "MethodSpec", "NUMPY_DTYPES", "Param", "Precision", "RankWindow", "TensorJob", "dare_keep",
           "merge_tensor", "method_spec", "promoted_dtype"]
