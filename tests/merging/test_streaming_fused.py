"""The fused (numba) chunk kernels of the streaming merges give the numpy kernels' bits
(mtl_jax.merging.streaming.fused vs mtl_jax.merging.streaming.kernels), chunk by chunk and end to
end through `mtl-jax merge --config`."""

import os

import jax
import ml_dtypes
import numpy as np
import pytest

from mtl_jax.merging import streaming as S
from mtl_jax.merging.background_import import NUMPY_KERNELS_ENV
from mtl_jax.merging.cli import main
from mtl_jax.merging.input_checks import FiniteCheck, NonFiniteInputError
from mtl_jax.merging.streaming import kernels as K
from mtl_jax.merging.streaming.kernels import CHUNK, Workspace
from mtl_jax.merging.streaming.ties_global import _FusedTiesKernel, _TiesKernel

numba = pytest.importorskip("numba", reason="numba not installed (pip install -e '.[fast]'): no fused kernels to test")
F = pytest.importorskip("mtl_jax.merging.streaming.fused")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIES_CONFIG = os.path.join(REPO, "configs", "merge", "ties_example.py")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), BF16, np.dtype(np.float16)]


class _Ready:
    """A loader whose fused module is there from the first chunk."""

    def ready(self):
        return F


def _inputs(rng, num_tasks, n, dtype, specials=True):
    """theta_0 and T fine-tuned flat arrays with zero deltas, +-0, and (``specials``) NaN / inf."""
    p = (rng.standard_normal(n) * 0.02).astype(np.float32)
    fts = [p + rng.standard_normal(n).astype(np.float32) * np.float32(1e-3) for _ in range(num_tasks)]
    for f in fts:
        f[rng.integers(0, n, 40)] = p[rng.integers(0, n, 40)]
        idx = rng.integers(0, n, 40)
        f[idx] = p[idx]  # zero task-vector entries
        f[rng.integers(0, n, 10)] = -0.0
        if specials:
            f[rng.integers(0, n, 3)] = np.nan
            f[rng.integers(0, n, 3)] = np.inf
            f[rng.integers(0, n, 3)] = -np.inf
    p[:4] = [-0.0, 0.0, -0.0, 0.0]
    if specials:
        p[rng.integers(0, n, 2)] = np.nan
    return p.astype(dtype), [f.astype(dtype) for f in fts]


def _run(kernel, num_tasks, p, fts, ws=None):
    """The kernel over every chunk of the flat inputs, in a fresh workspace; the output in p's dtype."""
    ws = ws or Workspace(num_tasks)
    ws.leaf = 3  # the leaf index the kernels are called with (chunk_pass sets it)
    out = np.full(p.shape, 7, p.dtype)
    for s in range(0, p.size, CHUNK):
        kernel(ws, 3, p, fts, out, s, min(s + CHUNK, p.size))
    return out


def _same_bits(a, b):
    """The same bits where not NaN (+-0 told apart), NaN at the same places: NaN payloads and signs
    are not kept (which NaN operand an add returns is up to the compiler, numpy's SIMD and scalar
    loops included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    nan = np.isnan(a.astype(np.float32))
    if not np.array_equal(nan, np.isnan(b.astype(np.float32))):
        return False
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return a.dtype == b.dtype and np.array_equal(a.view(bits)[~nan], b.view(bits)[~nan])


def _factories(num_tasks, rng):
    lam = rng.uniform(0.1, 1.0, num_tasks).astype(np.float32)
    tall = rng.uniform(0.2, 0.6, num_tasks).astype(np.float32)
    return {
        "task_arithmetic_kernel": (lam,),
        "weight_average_kernel": (lam / lam.sum(),),
        "dare_ta_kernel": (jax.random.key(5), 0.6, lam),
        "consensus_ta_kernel": (min(2, num_tasks), tall, 0.3),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("num_tasks", [1, 2, 8])
def test_per_entry_kernels_same_bits(num_tasks, dtype):
    """TA, averaging, DARE-TA, Consensus TA: NaN / inf (the check off), +-0, lengths that are no
    multiple of a chunk, a block or the vector width."""
    rng = np.random.default_rng(num_tasks)
    for n in (7, CHUNK + 1037):
        p, fts = _inputs(rng, num_tasks, n, dtype)
        for name, args in _factories(num_tasks, rng).items():
            want = _run(getattr(K, name)(*args), num_tasks, p, fts)
            got = _run(getattr(F, name)(*args), num_tasks, p, fts)
            assert _same_bits(want, got), (name, n)


def test_dare_keep_mask_is_the_counter_hash():
    key = jax.random.key(11)
    for index, start, p in ((0, 0, 0.9), (5, 3 * CHUNK, 0.5), (2**20, 2**32 - CHUNK, 0.3)):
        want = np.asarray(K._dare_keep_chunk(key, np.uint32(index), np.uint32(start), 3, p))
        assert np.array_equal(F.dare_keep_chunk(key, index, start, CHUNK, 3, p), want)


def _brackets(p, fts, rng):
    """Brackets [lo_t, hi_t) whose ends are magnitudes present in the inputs (ties at both ends)."""
    tau = np.stack([f.astype(np.float32) for f in fts]) - p.astype(np.float32)
    mag = np.sort(np.where(np.isfinite(tau), np.abs(tau), 0), axis=1)
    n = mag.shape[1]
    hi = mag[:, int(0.8 * n)]
    lo = mag[:, int(0.78 * n)]
    exact = rng.random(len(fts)) < 0.3  # lo = hi: an exact threshold
    return np.where(exact, hi, lo).astype(np.float32), hi.astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("num_tasks", [1, 5, 8])  # the kernel takes tasks four at a time, then one by one
def test_ties_kernel_same_bits_and_bookkeeping(num_tasks, dtype):
    """Outputs, counts above hi, majority, kept-aside positions (theta_0, tau) and candidates."""
    rng = np.random.default_rng(10 + num_tasks)
    p, fts = _inputs(rng, num_tasks, 2 * CHUNK + 517, dtype)
    for f in fts:  # magnitudes tie: rounded deltas
        f[:] = (p.astype(np.float32) + np.round((f.astype(np.float32) - p.astype(np.float32)) * 1e4) / 1e4).astype(dtype)
    lo, hi = _brackets(p, fts, rng)
    for lam in (np.float32(1.0), np.float32(0.37)):
        a, b = _TiesKernel(lo, hi, lam, ["leaf"] * 4), _FusedTiesKernel(lo, hi, lam, ["leaf"] * 4, _Ready())
        assert _same_bits(_run(a, num_tasks, p, fts), _run(b, num_tasks, p, fts))
        assert np.array_equal(a.above, b.above) and a.majority == b.majority
        assert len(a.deferred) == len(b.deferred) and sum(len(d.index) for d in a.deferred) > 0
        for x, y in zip(a.deferred, b.deferred):
            assert np.array_equal(x.index, y.index) and _same_bits(x.p0, y.p0) and _same_bits(x.tau, y.tau)
        for ca, cb in zip(a.candidates, b.candidates):
            assert len(ca) == len(cb) and all(_same_bits(u, v) for u, v in zip(ca, cb))


@pytest.mark.parametrize("name", ["task_arithmetic_kernel", "weight_average_kernel", "dare_ta_kernel", "consensus_ta_kernel",
                                  "ties"])
def test_non_finite_input_refused_naming_file_and_tensor(name):
    rng = np.random.default_rng(3)
    p, fts = _inputs(rng, 2, CHUNK + 5, np.float32, specials=False)
    fts[1][CHUNK + 2] = np.nan
    ws = Workspace(2, FiniteCheck(["p0.safetensors", "a.safetensors", "b.safetensors"], ["l0", "l1", "l2", "blocks.w"]))
    kernel = (_FusedTiesKernel(np.zeros(2, np.float32), np.ones(2, np.float32), np.float32(1), ["x"] * 4, _Ready())
              if name == "ties" else getattr(F, name)(*_factories(2, rng)[name]))
    with pytest.raises(NonFiniteInputError, match=r"b\.safetensors.*blocks\.w"):
        _run(kernel, 2, p, fts, ws)


def _checked_workspace(num_tasks):
    labels = ["p0.safetensors"] + [f"t{t}.safetensors" for t in range(num_tasks)]
    return Workspace(num_tasks, FiniteCheck(labels, ["l0", "l1", "l2", "blocks.w"]))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_dare_refuses_non_finite_entries_it_drops(value):
    """The per-block check of the fused DARE kernel sees task-vector entries the keep mask drops
    (the numpy kernel checks each task vector before the drop)."""
    rng = np.random.default_rng(4)
    n, p = CHUNK + 77, 0.6
    x0, fts = _inputs(rng, 2, n, np.float32, specials=False)
    dropped = ~F.dare_keep_chunk(jax.random.key(5), 3, 0, n, 2, p)  # leaf index 3, as _run calls it
    where = np.flatnonzero(dropped[1])[[5, -5]]  # one in each chunk
    fts[1][where] = value
    kernel = F.dare_ta_kernel(jax.random.key(5), p, np.array([0.4, 0.6], np.float32))
    with pytest.raises(NonFiniteInputError, match=r"t1\.safetensors.*blocks\.w"):
        _run(kernel, 2, x0, fts, _checked_workspace(2))


def test_overflowing_finite_inputs_are_merged_not_refused():
    """Finite inputs whose task vectors (or their per-entry sums, the fused kernels' cheap
    witness) overflow to inf: the input check finds nothing to refuse, and the outputs keep the
    numpy kernels' bits."""
    rng = np.random.default_rng(6)
    x0, fts = _inputs(rng, 3, CHUNK + 9, np.float32, specials=False)
    big = np.float32(3e38)
    x0[10:20], x0[CHUNK + 1] = -big, big
    for f in fts:
        f[10:20], f[CHUNK + 1] = big, -big  # tau = +-inf: the same input check as numpy's
        f[30:40] = big  # sums of finite tau_t overflow
    lo = np.array([1e-3, 0.0, 2e-3], np.float32)
    hi = np.array([2e-3, 0.0, 2e-3], np.float32)
    for name, args in _factories(3, rng).items():
        want = _run(getattr(K, name)(*args), 3, x0, fts, _checked_workspace(3))
        got = _run(getattr(F, name)(*args), 3, x0, fts, _checked_workspace(3))
        assert _same_bits(want, got), name
    a = _TiesKernel(lo, hi, np.float32(0.5), ["leaf"] * 4)
    b = _FusedTiesKernel(lo, hi, np.float32(0.5), ["leaf"] * 4, _Ready())
    assert _same_bits(_run(a, 3, x0, fts, _checked_workspace(3)), _run(b, 3, x0, fts, _checked_workspace(3)))
    assert np.array_equal(a.above, b.above) and a.majority == b.majority


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_ties_kernel_edge_brackets(num_tasks):
    """Brackets at the ends: hi = 0 (every entry kept, zero deltas too: their sums cancel to 0
    with kept entries), lo = 0 and hi = inf (almost every position kept aside), a negative lam,
    NaN / inf inputs (the check off)."""
    rng = np.random.default_rng(30 + num_tasks)
    x0, fts = _inputs(rng, num_tasks, CHUNK + 333, np.float32)
    cases = [(np.zeros(num_tasks), np.zeros(num_tasks)), (np.zeros(num_tasks), np.full(num_tasks, np.inf)),
             (np.full(num_tasks, 1e-4), np.r_[np.inf, np.full(num_tasks - 1, 0.0)])]
    for lo, hi in cases:
        lo, hi = lo.astype(np.float32), hi.astype(np.float32)
        a = _TiesKernel(lo, hi, np.float32(-0.7), ["leaf"] * 4)
        b = _FusedTiesKernel(lo, hi, np.float32(-0.7), ["leaf"] * 4, _Ready())
        assert _same_bits(_run(a, num_tasks, x0, fts), _run(b, num_tasks, x0, fts)), (lo, hi)
        assert np.array_equal(a.above, b.above) and a.majority == b.majority
        ia = np.concatenate([d.index for d in a.deferred]) if a.deferred else np.zeros(0, np.int64)
        ib = np.concatenate([d.index for d in b.deferred]) if b.deferred else np.zeros(0, np.int64)
        assert np.array_equal(ia, ib)


def test_ties_kernel_finite_blocks_and_exact_fallback():
    """Every hi_t > 0 (the kernel's finite-block path) with blocks holding inf (an overflowing
    task vector) or NaN, whose counts above hi_t the exact path redoes: the numpy kernel's bits,
    counts, majority, kept-aside positions and candidates."""
    rng = np.random.default_rng(8)
    x0, fts = _inputs(rng, 3, 2 * CHUNK + 3001, np.float32, specials=False)
    big = np.float32(3e38)
    x0[5], fts[0][5] = -big, big  # tau = inf in the first block
    fts[1][CHUNK + 2000] = np.nan  # a NaN in a later block
    fts[2][2 * CHUNK + 100] = -np.inf
    lo, hi = _brackets(x0, fts, rng)
    assert np.all(hi > 0)
    a = _TiesKernel(lo, hi, np.float32(0.5), ["leaf"] * 4)
    b = _FusedTiesKernel(lo, hi, np.float32(0.5), ["leaf"] * 4, _Ready())
    assert _same_bits(_run(a, 3, x0, fts), _run(b, 3, x0, fts))
    assert np.array_equal(a.above, b.above) and a.majority == b.majority
    for x, y in zip(a.deferred, b.deferred):
        assert np.array_equal(x.index, y.index) and _same_bits(x.p0, y.p0) and _same_bits(x.tau, y.tau)
    for ca, cb in zip(a.candidates, b.candidates):
        assert len(ca) == len(cb) and all(_same_bits(u, v) for u, v in zip(ca, cb))


@pytest.mark.parametrize("majority_count", [-10**9, "zero", 10**9])
def test_ties_patch_values_same_bits(majority_count):
    """The kept-aside outputs (fused.ties_patch_values) equal the numpy path's: trimmed by the
    exact thresholds, sums cancelling to 0 (the model-wide majority decides, also when it is 0),
    ties at the thresholds, NaN entries (never kept); a kept inf entry hands back to numpy. T = 8
    and tau pieces with the tasks contiguous (as numpy's kernel gathers them): numpy sums such an
    axis pairwise unless the path makes it C order."""
    from mtl_jax.merging.streaming.ties_global import _Deferred, _patch_values

    rng = np.random.default_rng(9)
    num, n = 8, 3000
    tau = np.round(rng.standard_normal((num, n)) * 100).astype(np.float32) / np.float32(100)
    tau[1, :200] = -tau[0, :200]  # sums cancel where tasks 2.. drop
    tau[2:, :200] = 0
    tau[3, 300:310] = np.nan
    thr = np.quantile(np.abs(tau[:, 200:]), 0.7, axis=1).astype(np.float32)  # ties at the threshold (rounded values)
    p0 = rng.standard_normal(n).astype(np.float32)
    if majority_count == "zero":  # the kept-aside signs cancel the others': majority 0
        majority_count = -int(np.sum(np.sign(np.sum(np.where(np.abs(tau) >= thr[:, None], tau, 0), axis=0))))
    pieces = [_Deferred("leaf", np.arange(s, min(s + 700, n)), p0[s : s + 700], tau[:, np.arange(s, min(s + 700, n))])
              for s in range(0, n, 700)]
    assert not pieces[0].tau.flags.c_contiguous
    lam = np.float32(0.37)
    want = _patch_values(pieces, thr, majority_count, lam, None)
    got = _patch_values(pieces, thr, majority_count, lam, _Ready())
    assert all(_same_bits(u, v) for u, v in zip(want, got))
    merged = F.ties_patch_values(tau, p0, thr, majority_count, lam)
    assert _same_bits(np.concatenate(want), merged)
    tau[4, 17] = np.inf
    assert F.ties_patch_values(tau, p0, thr, majority_count, lam) is None
    want = _patch_values(pieces, thr, majority_count, lam, None)
    assert all(_same_bits(u, v) for u, v in zip(want, _patch_values(pieces, thr, majority_count, lam, _Ready())))


def test_order_statistics_are_numpys_partition():
    """The radix select of the TIES sample bracket: np.partition's values at the ranks, with ties,
    +0.0, inf and NaN (sorted last), ranks at both ends."""
    rng = np.random.default_rng(12)
    values = np.abs(np.round(rng.standard_normal((4, 5000)) * 50) / 50 * np.float32(1e-3)).astype(np.float32)
    values[0, :100] = 0.0
    values[1, rng.integers(0, 5000, 30)] = np.nan
    values[2, rng.integers(0, 5000, 30)] = np.inf
    values[3] = np.float32(2.5)  # one value
    for ranks in ([0, 4999], [3900, 4000], [4990, 4991], [2500, 2500]):
        ranks = np.asarray(ranks, np.int64)
        got = np.empty((4, 2), np.float32)
        F.order_statistics(values, ranks, got)
        assert _same_bits(got, np.partition(values, ranks, axis=1)[:, ranks]), ranks


def _write_pool(folder, dtype, rng, num_tasks=3):
    """pretrained + task_t safetensors: leaves over a chunk and of odd lengths."""
    shapes = {"a.w": (300, 251), "b.w": (64, 33), "c.b": (7,), "d.w": (CHUNK + 3,)}
    p0 = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
    os.makedirs(folder, exist_ok=True)
    S.save_safetensors({k: v.astype(dtype) for k, v in p0.items()}, os.path.join(folder, "pretrained.safetensors"))
    for t in range(num_tasks):
        ft = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(1e-3)).astype(dtype) for k, v in p0.items()}
        S.save_safetensors(ft, os.path.join(folder, f"task_{t}.safetensors"))


MERGES = [
    ("task_arithmetic", "{'lam': 0.4}"),
    ("dare", "{'p': 0.7, 'lam': 0.5}"),
    ("consensus", "{'k': 2, 'lam': 0.3}"),
    ("ties", "{'top_k': 0.2, 'lam': 1.0}"),
]


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=lambda d: d.name)
def test_cli_streaming_merges_same_with_and_without_numba(tmp_path, monkeypatch, capsys, dtype):
    rng = np.random.default_rng(21)
    pool = tmp_path / "pool"
    _write_pool(str(pool), dtype, rng)
    loader = K.fused_loader()
    assert loader is not None and loader.wait() is F
    for method, hparams in MERGES:
        outs = {}
        for env in ("0", "1"):
            monkeypatch.setenv(NUMPY_KERNELS_ENV, env)
            outs[env] = str(tmp_path / f"{method}_{env}.safetensors")
            main(["merge", "--config", TIES_CONFIG, f"--config.model_pool={pool}", f"--config.output={outs[env]}",
                  f"--config.method={method}", f"--config.hparams={hparams}", "--config.progress=False"])
        capsys.readouterr()
        fused, numpy_ = S.load_safetensors(outs["0"]), S.load_safetensors(outs["1"])
        assert sorted(fused) == sorted(numpy_)
        for k in fused:
            assert fused[k].dtype == dtype and _same_bits(fused[k], numpy_[k]), (method, k)


def test_a_failed_background_import_is_raised_with_the_way_out():
    from mtl_jax.merging.background_import import BackgroundImport

    with pytest.raises(RuntimeError, match="importing mtl_jax.no_such_kernels failed .*MTL_JAX_NUMPY_KERNELS=1"):
        BackgroundImport("mtl_jax.no_such_kernels").wait()
