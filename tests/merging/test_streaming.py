"""Streaming merges (mtl_jax.merging.streaming) equal the in-memory merges and stay within memory."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.merging import (
    consensus_merging,
    dare_merging,
    lines_merging,
    task_arithmetic,
    ties_merging,
    weight_average,
)
from mtl_jax.merging import streaming as S
from mtl_jax.merging.streaming import ties_threshold
from mtl_jax.merging.tree import flatten_with_paths

from .helpers import jit_merge, random_tree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flat(tree):
    return dict(flatten_with_paths(tree))


def _save_models(tmp_path, p0, fts):
    S.save_safetensors(p0, str(tmp_path / "p0.safetensors"))
    paths = []
    for i, f in enumerate(fts):
        paths.append(str(tmp_path / f"ft{i}.safetensors"))
        S.save_safetensors(f, paths[-1])
    return str(tmp_path / "p0.safetensors"), paths


@pytest.fixture
def flat_models(rng):
    p0 = _flat(random_tree(rng))
    fts = [{k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()} for _ in range(3)]
    return p0, fts


CASES = [
    ("task_arithmetic", task_arithmetic, dict(lam=0.4)),
    ("weight_average", weight_average, {}),
    ("ties", ties_merging, dict(top_k=0.2, lam=1.0)),
    ("ties", ties_merging, dict(top_k=0.3, per_tensor=True)),
    ("dare", dare_merging, dict(p=0.5)),
    ("dare", dare_merging, dict(p=0.5, combine="ties")),
    ("consensus", consensus_merging, dict(k=2)),
    ("consensus", consensus_merging, dict(k=2, base="ties")),
    ("lines", lines_merging, dict(beta=0.5, base="ties")),
]


@pytest.mark.parametrize("name,fn,hparams", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streaming_equals_in_memory(tmp_path, flat_models, name, fn, hparams):
    """Groups of a few leaves (budget) for most methods; one leaf at a time for TA and TIES."""
    p0, fts = flat_models
    budget = 30000
    if name in ("task_arithmetic", "ties") and not hparams.get("per_tensor"):
        budget = None
    elif name == "dare":  # in one group and on 3 leaves: its random-bit kernels compile slowly
        budget = 10**9
        keep = sorted(p0)[:3]
        p0, fts = {k: p0[k] for k in keep}, [{k: f[k] for k in keep} for f in fts]
    if name == "dare":
        hparams = dict(hparams, key=jax.random.key(7))
    src, paths = _save_models(tmp_path, p0, fts)
    out = str(tmp_path / "out.safetensors")
    stats = S.stream_merge(src, paths, out, name, memory_budget=budget, **hparams)
    merged = S.load_safetensors(out)
    expected = jit_merge(fn, **hparams)(p0, fts)
    assert sorted(merged) == sorted(p0)
    for k in p0:
        np.testing.assert_allclose(merged[k], np.asarray(expected[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    if budget == 30000:
        assert 1 < stats["num_groups"] < len(p0)


def test_global_ties_threshold_is_exact_with_ties_in_magnitudes(tmp_path, rng):
    """Rounded deltas make many |tau| tie at the threshold: streaming keeps the same tied set."""
    p0 = _flat(random_tree(rng))
    fts = [{k: v + np.round(rng.normal(size=v.shape), 1).astype(np.float32) for k, v in p0.items()} for _ in range(3)]
    src, paths = _save_models(tmp_path, p0, fts)
    S.stream_merge(src, paths, str(tmp_path / "o.safetensors"), "ties", top_k=0.37)
    merged = S.load_safetensors(str(tmp_path / "o.safetensors"))
    expected = ties_merging(p0, fts, top_k=0.37)
    for k in p0:  # a wrongly kept/dropped entry would be off by ~0.1; jit may differ by an ulp
        np.testing.assert_allclose(merged[k], np.asarray(expected[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_bf16_preserved(tmp_path, flat_models):
    p0, fts = flat_models
    to_bf16 = lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}
    p0, fts = to_bf16(p0), [to_bf16(f) for f in fts]
    src, paths = _save_models(tmp_path, p0, fts)
    out = str(tmp_path / "out.safetensors")
    S.stream_merge(src, paths, out, "ties")
    merged = S.load_safetensors(out)
    expected = ties_merging(p0, fts)
    for k in p0:
        assert merged[k].dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(merged[k].astype(np.float32), np.asarray(expected[k], np.float32))
    header, _ = S.read_safetensors_header(out)
    assert {h[0].dtype for h in header.values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_interop_with_safetensors_library(tmp_path, flat_models):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    p0, fts = flat_models
    safetensors_numpy.save_file(p0, str(tmp_path / "p0.safetensors"))
    for i, f in enumerate(fts):
        safetensors_numpy.save_file(f, str(tmp_path / f"ft{i}.safetensors"))
    paths = [str(tmp_path / f"ft{i}.safetensors") for i in range(3)]
    out = str(tmp_path / "out.safetensors")
    S.stream_merge(str(tmp_path / "p0.safetensors"), paths, out, "task_arithmetic", mmap=True)
    merged = safetensors_numpy.load_file(out)  # our writer's file is valid for the reference reader
    expected = task_arithmetic(p0, fts)
    for k in p0:
        np.testing.assert_allclose(merged[k], np.asarray(expected[k]), rtol=1e-6, atol=1e-7)


def test_orbax_input_and_output(tmp_path, rng):
    ocp = pytest.importorskip("orbax.checkpoint")
    p0 = random_tree(rng)
    fts = [jax.tree_util.tree_map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), p0) for _ in range(2)]
    dirs = []
    with ocp.PyTreeCheckpointer() as ckptr:
        for i, tree in enumerate([p0] + fts):
            dirs.append(str(tmp_path / f"m{i}"))
            ckptr.save(dirs[-1], args=ocp.args.PyTreeSave(tree))
    S.stream_merge(dirs[0], dirs[1:], str(tmp_path / "out"), "task_arithmetic", memory_budget=20000)
    with ocp.PyTreeCheckpointer() as ckptr:
        merged = ckptr.restore(str(tmp_path / "out"))
    expected = task_arithmetic(p0, fts)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), merged, expected)


def test_shape_mismatch_names_the_leaf(tmp_path, flat_models):
    p0, fts = flat_models
    bad = dict(fts[1])
    bad["shared/block_1/Dense_0/kernel"] = np.zeros((16, 9), np.float32)
    src, paths = _save_models(tmp_path, p0, [fts[0], bad])
    with pytest.raises(ValueError, match=r"shape mismatch at 'shared/block_1/Dense_0/kernel'.*finetuned\[1\]"):
        S.stream_merge(src, paths, str(tmp_path / "out.safetensors"), "task_arithmetic")
    assert not os.path.exists(tmp_path / "out.safetensors")
    # an integer leaf where the others are floats: named, nothing written; bf16 next to fp32 still merges
    ints = dict(fts[0])
    ints["heads/cls/bias"] = np.zeros(fts[0]["heads/cls/bias"].shape, np.int32)
    (tmp_path / "ints").mkdir()
    src, paths = _save_models(tmp_path / "ints", p0, [ints, fts[1]])
    with pytest.raises(ValueError, match=r"dtype mismatch at 'heads/cls/bias': pretrained float32 vs finetuned\[0\] int32"):
        S.stream_merge(src, paths, str(tmp_path / "out2.safetensors"), "task_arithmetic")
    assert not os.path.exists(tmp_path / "out2.safetensors")
    assert S.dtype_class(jnp.bfloat16) == S.dtype_class(np.float32) == "float" and S.dtype_class(np.int8) == "int"


def test_budget_too_small_names_the_leaf(tmp_path, flat_models):
    p0, fts = flat_models
    src, paths = _save_models(tmp_path, p0, fts)
    with pytest.raises(ValueError, match=r"leaf 'heads/cls/bias' needs about \d+ bytes"):
        S.stream_merge(src, paths, str(tmp_path / "out.safetensors"), "ties", memory_budget=10)


def test_unknown_method_lists_valid_names(tmp_path, flat_models):
    p0, fts = flat_models
    src, paths = _save_models(tmp_path, p0, fts)
    with pytest.raises(ValueError, match="valid names: .*task_arithmetic.*ties"):
        S.stream_merge(src, paths, str(tmp_path / "o.safetensors"), "nope")


def test_plan_groups():
    assert S.plan_groups(["a", "b", "c"], [4, 4, 4], None) == [["a"], ["b"], ["c"]]
    assert S.plan_groups(["a", "b", "c"], [4, 4, 4], 8) == [["a", "b"], ["c"]]
    assert S.plan_groups(["a", "b", "c"], [4, 4, 4], 5) == [["a"], ["b"], ["c"]]


_PROBE = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    from mtl_jax.merging import streaming as S
    from mtl_jax.merging.streaming.kernels import fused_loader

    loader = fused_loader()  # numba (when installed) loaded before the warm-up runs, not during a measured one
    if loader is not None:
        loader.wait()

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    d, budget = sys.argv[1], int(sys.argv[2])
    paths = [f"{d}/p0.safetensors"] + [f"{d}/ft{i}.safetensors" for i in range(4)]
    out = {}
    for method in ("task_arithmetic", "ties"):
        S.stream_merge(paths[0], paths[1:], f"{d}/warm.safetensors", method, memory_budget=budget)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed heap back to the OS
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        S.stream_merge(paths[0], paths[1:], f"{d}/out.safetensors", method, memory_budget=budget)
        out[method] = status("VmHWM") - base
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_below_inputs(tmp_path):
    """5 inputs of 16 MiB (32 leaves of 512 KiB), budget of ~2 leaves: the peak extra RSS of a TA
    and a global TIES merge (measured in a fresh process after a warm-up run that compiles the
    kernels, whose freed heap is returned with malloc_trim) stays within the budget and far below
    the 80 MiB of inputs. One (real) CPU device, as a merge job runs; slack of 8 MiB for fixed
    costs (TIES histograms, allocator arenas)."""
    rng = np.random.default_rng(0)
    p0 = {f"layers.{i}.w": rng.normal(size=(256, 512)).astype(np.float32) for i in range(32)}
    S.save_safetensors(p0, str(tmp_path / "p0.safetensors"))
    for t in range(4):
        S.save_safetensors({k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()}, str(tmp_path / f"ft{t}.safetensors"))
    inputs_total = 5 * sum(v.nbytes for v in p0.values())
    spec = S.LeafSpec("w", (256, 512), np.dtype(np.float32))
    budget = 2 * S.leaf_working_set([spec] * 5, spec.dtype)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # not the 8 fake test devices
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path), str(budget)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]
    extra = json.loads(res.stdout.strip().splitlines()[-1])
    for method, peak in extra.items():
        assert peak < inputs_total / 2, (method, peak, inputs_total)
        assert peak < budget + (8 << 20), (method, peak, budget)


@pytest.mark.parametrize("top_k", [0.0, 1.0, 0.05])
def test_global_ties_extreme_top_k(tmp_path, flat_models, top_k):
    """k = 0 (threshold +inf, nothing kept), k = N (everything kept) and a small k: the
    histogram + deferred-bucket TIES equals the in-memory bisection."""
    p0, fts = flat_models
    src, paths = _save_models(tmp_path, p0, fts)
    S.stream_merge(src, paths, str(tmp_path / "o.safetensors"), "ties", top_k=top_k)
    merged = S.load_safetensors(str(tmp_path / "o.safetensors"))
    expected = jit_merge(ties_merging, top_k=top_k)(p0, fts)
    for k in p0:
        np.testing.assert_allclose(merged[k], np.asarray(expected[k]), rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.fixture
def wide_models(rng):
    """Leaves of several CHUNKs (so the numpy kernels split them over threads), T = 3 heavy-tailed
    task vectors; ~300k entries per model."""
    p0 = {f"layers.{i}.w": rng.normal(size=(384, 256)).astype(np.float32) for i in range(3)}
    p0["layers.0.b"] = rng.normal(size=(384,)).astype(np.float32)
    fts = [{k: v + 0.01 * rng.standard_t(3, size=v.shape).astype(np.float32) for k, v in p0.items()} for _ in range(3)]
    return p0, fts


def _assert_merged_equals(out, expected):
    merged = S.load_safetensors(out)
    for k in expected:
        np.testing.assert_allclose(merged[k], np.asarray(expected[k]), rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("z,passes", [(4.0, 2), (0.0, 4)], ids=["bracket-holds", "bracket-misses"])
def test_global_ties_sampled_bracket_is_exact(tmp_path, monkeypatch, wide_models, z, passes):
    """The sample bracket path (sample pass + output pass) and, when the bracket misses its
    threshold (z = 0: a zero-width bracket), the rewind to the exact histogram path (4 passes)
    both equal the in-memory TIES; so does a task vector with NaN / inf entries (NaN ranks above
    inf but is never kept)."""
    monkeypatch.setattr(ties_threshold, "MAX_BAND_FRACTION", 0.5)  # allow the wide band of a 4.5k-entry sample
    monkeypatch.setattr(ties_threshold, "SAMPLE_Z", z)
    p0, fts = wide_models
    fts[1]["layers.2.w"][3, :7] = np.nan
    fts[2]["layers.1.w"][5, 2] = np.inf
    src, paths = _save_models(tmp_path, p0, fts)
    out = str(tmp_path / "out.safetensors")
    stats = S.stream_merge(src, paths, out, "ties", top_k=0.2, lam=0.9, threads=2, allow_nonfinite=True)
    assert stats["passes"] == passes
    _assert_merged_equals(out, jit_merge(ties_merging, top_k=0.2, lam=0.9)(p0, fts))


def test_ties_threshold_from_sample_bracket(tmp_path, monkeypatch, wide_models):
    """Consensus TIES (its TIES thresholds: sample pass + counting pass) equals the in-memory merge."""
    monkeypatch.setattr(ties_threshold, "MAX_BAND_FRACTION", 0.5)
    p0, fts = wide_models
    src, paths = _save_models(tmp_path, p0, fts)
    out = str(tmp_path / "out.safetensors")
    S.stream_merge(src, paths, out, "consensus", k=2, base="ties", memory_budget=1 << 30)
    _assert_merged_equals(out, jit_merge(consensus_merging, k=2, base="ties")(p0, fts))


@pytest.mark.parametrize("name,hparams", [("task_arithmetic", {}), ("ties", {}), ("dare", dict(p=0.5)),
                                          ("consensus", dict(k=2))])
def test_threads_do_not_change_the_result(tmp_path, wide_models, name, hparams):
    """1 or 3 worker threads (a leaf's chunks split into contiguous runs) write the same bytes."""
    p0, fts = wide_models
    if name == "dare":
        hparams = dict(hparams, key=jax.random.key(3))
    src, paths = _save_models(tmp_path, p0, fts)
    outs = []
    for threads in (1, 3):
        outs.append(str(tmp_path / f"out{threads}.safetensors"))
        S.stream_merge(src, paths, outs[-1], name, threads=threads, **hparams)
    with open(outs[0], "rb") as a, open(outs[1], "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("stage", [4096, 3 * 4096, 1 << 20])
def test_direct_writer_writes_the_buffered_bytes(tmp_path, monkeypatch, stage):
    """O_DIRECT output (aligned staging, padded tail, trimmed at close) is byte-identical to the
    buffered writer through odd-sized bf16 / fp32 leaves, a patch of a leaf whose end is still
    staged, a rewind and a second attempt; and is taken where the file system allows it."""
    probe = S.DirectAppender.open_direct(str(tmp_path / "probe"))
    if probe is None:
        pytest.skip("this file system refuses O_DIRECT (the writer falls back to buffered writes)")
    probe.finish()
    os.remove(tmp_path / "probe")
    monkeypatch.setattr(S.DirectAppender, "STAGE", stage)
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(37, 29)).astype(np.float32),
              "b": rng.normal(size=(1001,)).astype(ml_dtypes.bfloat16),
              "c": rng.normal(size=(3, 2049)).astype(np.float32)}
    specs = [S.LeafSpec(n, a.shape, a.dtype) for n, a in arrays.items()]
    patch = (np.array([0, 500, 1000]), np.array([7.0, -7.0, 9.0]))
    outputs = {}
    for direct in (True, False):
        path = str(tmp_path / f"out_{direct}.safetensors")
        writer = S.SafetensorsWriter(path, specs, {"k": "v"}, direct=direct)
        assert isinstance(writer._out, S.DirectAppender) == direct
        for n in ("a", "b"):
            writer.write(n, arrays[n] * 0)  # a first attempt, rewound
        writer.rewind()
        writer.write("a", arrays["a"])
        writer.write("b", arrays["b"])
        writer.patch("b", *patch)
        writer.write("c", arrays["c"])
        writer.patch("c", np.array([1, 4000, 6146]), np.array([1.5, 2.5, 3.5]))  # f32 entries across blocks
        writer.close()
        outputs[direct] = open(path, "rb").read()
    assert outputs[True] == outputs[False]
    back = S.load_safetensors(str(tmp_path / "out_True.safetensors"))
    expected_b = arrays["b"].copy()
    expected_b[patch[0]] = patch[1].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(back["b"], expected_b)
    expected_c = arrays["c"].reshape(-1).copy()
    expected_c[[1, 4000, 6146]] = [1.5, 2.5, 3.5]
    np.testing.assert_array_equal(back["c"].reshape(-1), expected_c)


def test_direct_writer_background_write_error_is_raised(tmp_path, monkeypatch):
    """A failed background write (the stage being written while the next is filled) raises on
    the writer's next call, not silently."""
    appender = S.DirectAppender.open_direct(str(tmp_path / "out.bin"))
    if appender is None:
        pytest.skip("this file system refuses O_DIRECT (the writer falls back to buffered writes)")
    failing = np.dtype(np.uint8)

    def pwrite(buf, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(appender, "_pwrite", pwrite)
    appender.append(np.zeros(appender.STAGE, failing))  # handed to the I/O thread
    with pytest.raises(OSError, match="No space left"):
        appender.append(np.zeros(appender.STAGE, failing))
    appender.discard()


def test_writer_abort_and_incomplete_close_leave_no_output(tmp_path):
    path = str(tmp_path / "out.safetensors")
    specs = [S.LeafSpec("a", (3,), np.dtype(np.float32)), S.LeafSpec("b", (2,), np.dtype(np.float32))]
    writer = S.SafetensorsWriter(path, specs)
    writer.write("a", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="only 1 of 2 leaves"):
        writer.close()
    writer = S.SafetensorsWriter(path, specs)
    writer.abort()
    assert not os.listdir(tmp_path)
