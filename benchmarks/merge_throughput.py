"""Merge throughput and peak memory on CPU: ours (in-memory jitted, streaming) vs FusionBench,
MergeKit and a plain numpy read-all-inputs/write-one-output pass (the I/O floor).

    python -m benchmarks.merge_throughput                    # T=8 task vectors of a ~100M model
    python -m benchmarks.merge_throughput --params 5e6       # quick run
    python -m benchmarks.merge_throughput --rounds 5 --impls floor,ours_stream   # ours vs floor only
    python -m benchmarks.merge_throughput --impls floor,floor_mmap,ours_stream,ours_stream_numpy,mergekit --methods ta,ties,dare,consensus --profile

Inputs: a ViT-B-like list of fp32 matrices (12 blocks of qkv/proj/fc1/fc2 + biases + LayerNorms,
patch/position embeddings, and a token embedding that tops the count up to ``--params``),
generated with a fixed seed and written as safetensors to a temp dir (pretrained + T fine-tuned,
deltas of scale 1e-3). Every (implementation, method) runs in a fresh subprocess that reports its
own phase times and peak RSS (``ru_maxrss``) and its RSS after imports; a watchdog kills a run
whose RSS passes ``--rss-limit-gb`` (the machine is shared). Peers run in ``.peers-merge-venv``
(torch 2.13 CPU, fusion-bench, mergekit) through ``benchmarks/peers/merge_peer.py``.

``--rounds R`` runs the floor and our streaming merges R times, interleaved (floor, then each
method, per round), and reports medians; before every run the inputs are read once untimed, so
every implementation starts from the page cache (measured: in-memory bandwidth, not the disk); the other implementations run once (``--peer-rounds``).
Ratios: ``x floor`` = time / the floor's median; ``peer / ours`` = a peer's time / our streaming
time for that method; ``RSS / (in+2)`` = peak RSS / (inputs + 2 models).

Methods: TA (lam 0.3), TIES (top 20% over the whole model, lam 1; MergeKit trims per tensor),
DARE (p 0.9, lam 0.3), Consensus TA (k 2, TALL lambda 0.4, lam 0.3; MergeKit has none).
Prints one JSON document, then a table of times, peak RSS and ratios.

CPU seconds (user + system, all threads) are reported beside wall times: on a shared machine
they are the steadier measure; ``--profile`` adds a per-pass table of our streaming merges (wall,
kernel and writer-wait seconds per pass, against floor_mmap), run in this process.

``ours_stream`` runs the fused (numba) chunk kernels where numba is installed
(:mod:`mtl_jax.merging.streaming.fused`), ``ours_stream_numpy`` the numpy kernels
(``MTL_JAX_NUMPY_KERNELS=1``); the same output bits. numba's start-up (import, compiler
registries, cached machine code; a fixed cost per process) runs before the timed merge, like the
imports, and is reported on its own line.

MergeKit YAML mode (``mtl-jax merge --mergekit-yaml`` vs ``mergekit-yaml`` in ``.peers-venv``,
TinyLlama-like bf16 models, base + 2 fine-tuned, ties / task_arithmetic / linear; each run a fresh
process, wall and CPU time and its own peak RSS from ``wait4``; rounds interleave the floor (read
every input file, write one), ours and MergeKit; ``--profile``: seconds in our statistics passes,
output passes and writer waits)::

    python -m benchmarks.merge_throughput --mergekit-yaml --params 1.1e9 --rounds 2 --dir /tmp/mk_bench --profile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PY = next((p for p in (os.path.join(REPO, v, "bin", "python") for v in (".peers-merge-venv", ".peers-venv"))
                if os.path.exists(p)), os.path.join(REPO, ".peers-venv", "bin", "python"))  # mergekit is in both
PEER_DRIVER = os.path.join(REPO, "benchmarks", "peers", "merge_peer.py")
METHODS = ("ta", "ties", "dare", "consensus")
IMPLS = ("floor", "floor_mmap", "ours_mem", "ours_stream", "ours_stream_numpy", "fusionbench", "mergekit")
STREAMS = ("ours_stream", "ours_stream_numpy")
FLOORS = ("floor", "floor_mmap")


# --------------------------------------------------------------------------------- the model


def vit_like_shapes(num_params: float, blocks: int = 12) -> dict[str, tuple[int, ...]]:
    """ViT-B-like leaf shapes (width 768, MLP 3072) with a token embedding sized so the total is
    about ``num_params``; the width shrinks (multiples of 64) when the blocks alone exceed it."""
    width = 768
    while width > 64 and blocks * 12 * width * width > 0.9 * num_params:
        width -= 64
    mlp = 4 * width
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.weight": (width, 3 * 16 * 16),
        "pos_embed": (197, width),
        "norm.scale": (width,),
        "norm.bias": (width,),
    }
    for b in range(blocks):
        p = f"blocks.{b}."
        shapes.update({
            p + "attn.qkv.weight": (width, 3 * width), p + "attn.qkv.bias": (3 * width,),
            p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
            p + "mlp.fc1.weight": (width, mlp), p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (mlp, width), p + "mlp.fc2.bias": (width,),
            p + "norm1.scale": (width,), p + "norm1.bias": (width,),
            p + "norm2.scale": (width,), p + "norm2.bias": (width,),
        })
    used = sum(int(np.prod(s)) for s in shapes.values())
    vocab = max(int(num_params - used) // width, 1)
    shapes["token_embed.weight"] = (vocab, width)
    return shapes


def write_models(directory: str, shapes: dict, num_tasks: int, seed: int = 0) -> int:
    """pretrained.safetensors + task_{t}.safetensors, leaf by leaf (never a whole model in memory).
    Returns the bytes of one model."""
    from mtl_jax.merging.streaming import LeafSpec, SafetensorsWriter

    names = sorted(shapes)
    specs = [LeafSpec(n, shapes[n], np.dtype(np.float32)) for n in names]

    def leaf(i, t):
        x = np.random.default_rng([seed, i, 0]).standard_normal(shapes[names[i]], dtype=np.float32) * 0.02
        if t >= 0:
            x += np.random.default_rng([seed, i, t + 1]).standard_normal(shapes[names[i]], dtype=np.float32) * 1e-3
        return x

    for t in range(-1, num_tasks):
        path = os.path.join(directory, "pretrained.safetensors" if t < 0 else f"task_{t}.safetensors")
        writer = SafetensorsWriter(path, specs)
        for i, n in enumerate(names):
            writer.write(n, leaf(i, t))
        writer.close()
    return sum(s.nbytes for s in specs)


# ---------------------------------------------------------------------------------- workers


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _report(t0, t1, t2, t3, base, cpu0=0.0):
    """One JSON line: phase times, CPU seconds of the timed part (user + system, all threads;
    steadier than wall time on a loaded machine), peak and base RSS."""
    print(json.dumps({"load_s": t1 - t0, "merge_s": t2 - t1, "write_s": t3 - t2, "total_s": t3 - t0,
                      "cpu_s": _cpu_s() - cpu0, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "base_rss": base}))


def worker_floor(d: str, num_tasks: int, out: str) -> None:
    """Plain numpy: read every leaf of every input (one readinto each), write one output leaf
    (the pretrained one) per leaf: the I/O a merge cannot avoid."""
    import struct

    paths = [f"{d}/pretrained.safetensors"] + [f"{d}/task_{t}.safetensors" for t in range(num_tasks)]
    base = _rss_now()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    with open(paths[0], "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header_raw = f.read(n)
    header = {k: v for k, v in json.loads(header_raw).items() if k != "__metadata__"}
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    files = [open(p, "rb", buffering=0) for p in paths]
    with open(out, "wb") as fo:
        fo.write(struct.pack("<Q", n) + header_raw)
        for name in order:
            b, e = header[name]["data_offsets"]
            bufs = []
            for f in files:
                buf = np.empty(e - b, np.uint8)
                f.seek(8 + n + b)
                f.readinto(memoryview(buf))
                bufs.append(buf)
            fo.write(memoryview(bufs[0]))
    for f in files:
        f.close()
    t1 = time.perf_counter()
    _report(t0, t1, t1, t1, base, cpu0)


def worker_floor_mmap(d: str, num_tasks: int, out: str) -> None:
    """A second, stricter floor: every input mapped (no copy out of the page cache), each leaf's
    T + 1 inputs added into one reused fp32 buffer chunk by chunk (one add per input entry: the
    least work that reads every input value), one write per output leaf."""
    from mtl_jax.merging.streaming import CHUNK, SafetensorsReader

    base = _rss_now()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    readers = [SafetensorsReader(f"{d}/pretrained.safetensors")] + [
        SafetensorsReader(f"{d}/task_{t}.safetensors") for t in range(num_tasks)]
    names = sorted(readers[0].specs)
    acc = np.empty(max(readers[0].specs[n].size for n in names), np.float32)
    with open(out, "wb") as fo:
        for name in names:
            views = [r.view(name).reshape(-1) for r in readers]
            n = views[0].size
            for s in range(0, n, CHUNK):
                e = min(s + CHUNK, n)
                np.copyto(acc[s:e], views[0][s:e])
                for v in views[1:]:
                    acc[s:e] += v[s:e]
            fo.write(memoryview(acc[:n]))
            del views
            for r in readers:
                r.release(name)
    for r in readers:
        r.close()
    t1 = time.perf_counter()
    _report(t0, t1, t1, t1, base, cpu0)


def _ours_fn(method: str):
    import jax

    from mtl_jax.merging import (
        consensus_merging,
        dare_merging,
        task_arithmetic,
        ties_merging,
    )

    return {
        "ta": ("task_arithmetic", task_arithmetic, dict(lam=0.3)),
        "ties": ("ties", ties_merging, dict(top_k=0.2, lam=1.0)),
        "dare": ("dare", dare_merging, dict(key=jax.random.key(0), p=0.9, lam=0.3)),
        "consensus": ("consensus", consensus_merging, dict(k=2, tall_lambda=0.4, lam=0.3)),
    }[method]


def worker_ours_mem(method: str, d: str, num_tasks: int, out: str) -> None:
    """Load every model into memory, run the jitted pytree merge, write the output."""
    import functools

    import jax
    import jax.numpy as jnp

    from mtl_jax.merging.streaming import SafetensorsReader, save_safetensors

    def load(path):  # leaf by leaf into jax arrays: no second (numpy) copy of the inputs stays alive
        reader = SafetensorsReader(path)
        tree = {n: jnp.asarray(reader.read(n)) for n in sorted(reader.specs)}
        reader.close()
        return tree

    _, fn, hp = _ours_fn(method)
    base = _rss_now()
    t0 = time.perf_counter()
    p0 = load(f"{d}/pretrained.safetensors")
    fts = [load(f"{d}/task_{t}.safetensors") for t in range(num_tasks)]
    t1 = time.perf_counter()
    merged = jax.block_until_ready(jax.jit(functools.partial(fn, **hp))(p0, fts))
    t2 = time.perf_counter()
    del fts
    save_safetensors(merged, out)
    t3 = time.perf_counter()
    _report(t0, t1, t2, t3, base)


def load_fused_kernels() -> dict:
    """Start numba and load the fused kernels (when installed and not switched off), as the
    imports are, before the timed merge: its wall and CPU seconds (a fixed cost per process,
    reported beside the merge time)."""
    from mtl_jax.merging.streaming.kernels import fused_loader

    cpu0, t0 = _cpu_s(), time.perf_counter()
    loader = fused_loader()
    if loader is None:
        return {}
    loader.wait()
    return {"kernels_load_s": time.perf_counter() - t0, "kernels_load_cpu_s": _cpu_s() - cpu0}


def worker_ours_stream(method: str, d: str, num_tasks: int, out: str, budget: int) -> None:
    """Streaming merge (leaf groups within ``budget`` bytes, 0 = one leaf at a time); all time
    counts as 'merge'. The fused kernels' start-up runs before, untimed like the imports (and is
    reported)."""
    from mtl_jax.merging.streaming import stream_merge

    name, _, hp = _ours_fn(method)
    load = load_fused_kernels()
    base = _rss_now()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    stats = stream_merge(f"{d}/pretrained.safetensors", [f"{d}/task_{t}.safetensors" for t in range(num_tasks)],
                         out, name, memory_budget=budget or None, **hp)
    t1 = time.perf_counter()
    _report(t0, t0, t1, t1, base, cpu0)
    print(json.dumps(dict(load, passes=stats["passes"], groups=stats["num_groups"])))


# ------------------------------------------------------------------------- per-pass profiles


def profile_streaming(d: str, num_tasks: int, methods: list[str], budget: int) -> list[dict]:
    """In this process: floor_mmap once, then each streaming merge with
    ``mtl_jax.merging.streaming.passes.PASS_LOG`` on; one row per pass (wall, kernel seconds summed
    over the worker threads, time the pass waited for the writer), and the merge's total wall and
    CPU seconds."""
    import contextlib
    import io

    from mtl_jax.merging.streaming import passes, stream_merge
    from mtl_jax.merging.streaming.kernels import NUMPY_KERNELS_ENV

    out = os.path.join(d, "profile_out.safetensors")
    rows = []
    load_fused_kernels()
    warm_page_cache(d, num_tasks)
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        worker_floor_mmap(d, num_tasks, out)
    floor = json.loads(captured.getvalue().splitlines()[0])
    rows.append({"method": "floor_mmap", "pass": "(all)", "leaves": 0, "wall_s": floor["total_s"], "kernel_s": float("nan"),
                 "write_wait_s": float("nan"), "cpu_s": floor["cpu_s"]})
    for m, numpy_kernels in ((m, k) for m in methods for k in (False, True)):
        name, _, hp = _ours_fn(m)
        warm_page_cache(d, num_tasks)
        passes.PASS_LOG = []
        os.environ[NUMPY_KERNELS_ENV] = "1" if numpy_kernels else "0"
        cpu0, t0 = _cpu_s(), time.perf_counter()
        try:
            stream_merge(f"{d}/pretrained.safetensors", [f"{d}/task_{t}.safetensors" for t in range(num_tasks)], out, name,
                         memory_budget=budget or None, overwrite=True, **hp)
            wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
            log, passes.PASS_LOG = passes.PASS_LOG, None
        finally:
            passes.PASS_LOG = None
            os.environ.pop(NUMPY_KERNELS_ENV)
            if os.path.exists(out):
                os.remove(out)
        label = f"{m} numpy" if numpy_kernels else m
        rows += [dict(r, method=label, cpu_s=float("nan")) for r in log]
        rows.append({"method": label, "pass": "(total)", "leaves": 0, "wall_s": wall,
                     "kernel_s": sum(r["kernel_s"] for r in log), "write_wait_s": sum(r["write_wait_s"] for r in log),
                     "cpu_s": cpu})
    return rows


def profile_table(rows: list[dict]) -> str:
    floor = next((r["wall_s"] for r in rows if r["method"] == "floor_mmap"), float("nan"))
    lines = ["per-pass profile (one process; kernel s = time in the chunk kernels summed over worker threads; write wait = "
             "time the pass waited for the output writer; x fl_mmap = wall / floor_mmap wall)",
             f"{'method':16s} {'pass':28s} {'leaves':>6s} {'wall s':>7s} {'kernel s':>8s} {'write wait':>10s} {'cpu s':>6s} {'x fl_mmap':>9s}"]
    for r in rows:
        lines.append(f"{r['method']:16s} {r['pass']:28s} {r['leaves']:6d} {r['wall_s']:7.2f} {r['kernel_s']:8.2f} "
                     f"{r['write_wait_s']:10.2f} {r['cpu_s']:6.2f} {r['wall_s'] / floor:9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- driver


def warm_page_cache(d: str, num_tasks: int) -> None:
    """Read every input file once (not timed), so that each run starts from the page cache
    whatever the run before it left there (the machine's other jobs evict it)."""
    buf = bytearray(16 << 20)
    for name in ["pretrained"] + [f"task_{t}" for t in range(num_tasks)]:
        with open(os.path.join(d, f"{name}.safetensors"), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_child(cmd: list[str], rss_limit: int, timeout: float) -> dict:
    """Run one worker; poll its RSS (kill past ``rss_limit``); parse its first JSON line."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next((int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS")), 0)
        except OSError:
            rss = 0
        if rss > rss_limit:
            killed = f"out of memory: RSS {rss / 2**30:.1f} GiB > cap {rss_limit / 2**30:.1f} GiB (killed)"
        elif time.perf_counter() - start > timeout:
            killed = f"killed: over {timeout:.0f} s"
        if killed:
            proc.kill()
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if killed:
        return {"error": killed, "wall_s": wall}
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}", "wall_s": wall}
    res = json.loads(lines[0])
    for extra in lines[1:]:
        res.update(json.loads(extra))
    res["wall_s"] = wall
    return res


def command(impl: str, method: str, d: str, num_tasks: int, out: str, budget: int) -> list[str] | None:
    me = [sys.executable, "-m", "benchmarks.merge_throughput", "--worker", impl, "--method", method, "--dir", d,
          "--tasks", str(num_tasks), "--out", out, "--budget", str(budget)]
    if impl in ("floor", "floor_mmap", "ours_mem") + STREAMS:
        return me
    if impl == "mergekit" and method == "consensus":
        return None
    return [PEER_PY, PEER_DRIVER, impl, method, d, str(num_tasks), out]


def summarise(runs: list[dict]) -> dict:
    """Medians over the successful rounds of one (implementation, method): total_s, merge_s,
    peak_rss, base_rss, plus every round's total_s; the first error if no round succeeded."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(runs[0], rounds=len(runs))
    med = {k: float(np.median([r.get(k, np.nan) for r in ok]))
           for k in ("total_s", "merge_s", "cpu_s", "peak_rss", "base_rss", "kernels_load_s", "kernels_load_cpu_s")}
    return dict(med, rounds=len(ok), totals_s=[round(r["total_s"], 3) for r in ok],
                **{k: ok[0][k] for k in ("passes", "groups") if k in ok[0]})


def table(results: dict, model_bytes: int, num_tasks: int) -> str:
    gib = lambda b: f"{b / 2**30:5.2f}"
    floor = results.get("floor", {}).get("-", {})
    floor_s = floor.get("total_s", float("nan"))
    mm = results.get("floor_mmap", {}).get("-", {})
    mm_s = mm.get("total_s", float("nan"))
    budget = (num_tasks + 3) * model_bytes  # inputs + 2 models
    mm_cpu = mm.get("cpu_s", float("nan"))
    cfg = results.get("config", {})
    lines = [f"model {model_bytes / 2**20:.0f} MiB fp32, T={num_tasks}, inputs {(num_tasks + 1) * model_bytes / 2**30:.2f} GiB; "
             f"load average {cfg.get('loadavg_start', ['?'])[0]} -> {cfg.get('loadavg_end', ['?'])[0]} on {cfg.get('cpus')} cpus",
             f"floor (read all + write one) {floor_s:.2f} s, cpu {floor.get('cpu_s', float('nan')):.2f} s "
             f"(median of {floor.get('rounds', 0)}); floor_mmap (mapped inputs, one add per input entry) {mm_s:.2f} s, "
             f"cpu {mm_cpu:.2f} s (median of {mm.get('rounds', 0)})",
             f"{'method':10s} {'impl':12s} {'rounds':>6s} {'total s':>8s} {'cpu s':>7s} {'peak GiB':>8s} {'x floor':>8s} "
             f"{'x fl_mmap':>9s} {'cpu x mm':>8s} {'peer/ours':>9s} {'RSS/(in+2)':>10s}"]
    for m in METHODS:
        ours = results.get("ours_stream", {}).get(m, {})
        for impl in IMPLS[2:]:
            r = results.get(impl, {}).get(m)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"{m:10s} {impl:12s} {r['error']}")
                continue
            tot = r["total_s"]
            vs_ours = f"{tot / ours['total_s']:9.2f}" if impl != "ours_stream" and ours.get("total_s") else f"{'-':>9s}"
            cpu = r.get("cpu_s", float("nan"))
            lines.append(f"{m:10s} {impl:12s} {r.get('rounds', 1):6d} {tot:8.2f} {cpu:7.2f} {gib(r['peak_rss']):>8s} "
                         f"{tot / floor_s:8.2f} {tot / mm_s:9.2f} {cpu / mm_cpu:8.2f} {vs_ours} {r['peak_rss'] / budget:10.2f}")
    loads = [r for r in results.get("ours_stream", {}).values() if np.isfinite(r.get("kernels_load_s", np.nan))]
    if loads:
        lines.append(f"ours_stream: numba start-up + fused kernel load before each timed merge (untimed, like the imports): "
                     f"wall {np.median([r['kernels_load_s'] for r in loads]):.2f} s, "
                     f"cpu {np.median([r['kernels_load_cpu_s'] for r in loads]):.2f} s (median); ours_stream_numpy: none")
    return "\n".join(lines)


# ------------------------------------------------------------------ MergeKit YAML comparison

MK_METHODS = ("ties", "task_arithmetic", "linear")
MK_YAML = {
    "ties": "merge_method: ties\nbase_model: {d}/m0\nmodels:\n  - model: {d}/m1\n    parameters: {{density: 0.2, weight: 0.6}}\n"
            "  - model: {d}/m2\n    parameters: {{density: 0.3, weight: 0.4}}\nparameters: {{normalize: true}}\ndtype: bfloat16\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {d}/m0\nmodels:\n  - model: {d}/m1\n    parameters: {{weight: 0.5}}\n"
                       "  - model: {d}/m2\n    parameters: {{weight: [0.2, 0.8]}}\ndtype: bfloat16\n",
    "linear": "merge_method: linear\nmodels:\n  - model: {d}/m0\n    parameters: {{weight: 0.2}}\n  - model: {d}/m1\n"
              "    parameters: {{weight: 0.4}}\n  - model: {d}/m2\n    parameters: {{weight: 0.4}}\ndtype: bfloat16\n",
}


def llama_shapes(num_params: float, hidden: int = 2048, mlp: int = 5632, vocab: int = 32000, kv: int = 256) -> tuple[dict, dict]:
    """TinyLlama-1.1B-like shapes (hidden 2048, MLP 5632, 4 key/value heads of 64, vocabulary
    32000, untied head) with as many layers as fit ``num_params`` (at least 1); and its config.json."""
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * mlp + 2 * hidden
    layers = max(1, round((num_params - 2 * vocab * hidden - hidden) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.v_proj.weight": (kv, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden), p + "post_attention_layernorm.weight": (hidden,),
                       p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
                       p + "mlp.down_proj.weight": (hidden, mlp)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": mlp,
              "num_attention_heads": hidden // 64, "num_key_value_heads": kv // 64, "num_hidden_layers": layers,
              "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "hidden_act": "silu"}
    return shapes, config


def write_llama_folders(d: str, num_params: float, num_models: int = 3, seed: int = 0) -> int:
    """``d/m0`` (random, scale 0.02) and ``d/m{k}`` = m0 + N(0, 1e-3) offsets, bf16, one
    ``model.safetensors`` each, tensor by tensor. Returns the parameter count."""
    from mtl_jax.merging.mergekit.methods import BF16
    from mtl_jax.merging.streaming import LeafSpec, SafetensorsWriter

    shapes, config = llama_shapes(num_params)
    names = list(shapes)
    for k in range(num_models):
        folder = os.path.join(d, f"m{k}")
        if os.path.exists(os.path.join(folder, "model.safetensors")):
            continue
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        writer = SafetensorsWriter(os.path.join(folder, "model.safetensors"), [LeafSpec(n, shapes[n], BF16) for n in names])
        for i, n in enumerate(names):
            x = np.random.default_rng([seed, i, 0]).standard_normal(shapes[n], dtype=np.float32) * np.float32(0.02)
            if k:
                x += np.random.default_rng([seed, i, k]).standard_normal(shapes[n], dtype=np.float32) * np.float32(1e-3)
            writer.write(n, x.astype(BF16))
        writer.close()
    return sum(int(np.prod(s)) for s in shapes.values())


def run_measured(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; its wall time and its own peak RSS (``wait4``'s ``ru_maxrss``)."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > timeout:
            proc.kill()
            os.wait4(proc.pid, 0)
            return {"error": f"killed: over {timeout:.0f} s"}
        time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace").strip()
    if proc.returncode:
        return {"error": f"exit {proc.returncode}: {err.splitlines()[-1] if err else ''}", "wall_s": wall}
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024}


def worker_floor_files(paths: list[str], out: str) -> None:
    """The I/O floor of a merge of whole files: read every input once (16 MiB ``readinto``s) and
    write the first one's bytes as the output."""
    buf = np.empty(16 << 20, np.uint8)
    with open(out, "wb") as fo:
        for i, path in enumerate(paths):
            with open(path, "rb", buffering=0) as f:
                while got := f.readinto(memoryview(buf)):
                    if i == 0:
                        fo.write(memoryview(buf)[:got])


def profile_mergekit(yaml_paths: dict[str, str], d: str) -> list[dict]:
    """In this process, each YAML through ``run_mergekit_yaml`` with
    ``mtl_jax.merging.mergekit.methods.PHASE_SECONDS`` on: seconds in the statistics passes, the
    output passes and waiting for the writer, and the total wall / CPU seconds."""
    from mtl_jax.merging.mergekit import methods as mk_methods
    from mtl_jax.merging.mergekit import run_mergekit_yaml

    rows = []
    for m, y in yaml_paths.items():
        out = os.path.join(d, f"profile_out_{m}")
        shutil.rmtree(out, ignore_errors=True)
        mk_methods.PHASE_SECONDS = {}
        cpu0, t0 = _cpu_s(), time.perf_counter()
        try:
            run_mergekit_yaml(y, out)
            rows.append(dict(mk_methods.PHASE_SECONDS, method=m, wall_s=time.perf_counter() - t0, cpu_s=_cpu_s() - cpu0))
        finally:
            mk_methods.PHASE_SECONDS = None
            shutil.rmtree(out, ignore_errors=True)
    return rows


def mergekit_yaml_compare(args) -> None:
    """Ours (``mtl-jax merge --mergekit-yaml``) vs ``mergekit-yaml`` (.peers-venv, its lazy
    safetensors loader, CPU) on 3 bf16 Llama-layout models, interleaved per round."""
    d = args.dir or tempfile.mkdtemp(prefix="mergekit_bench_")
    os.makedirs(d, exist_ok=True)
    mergekit = os.path.join(REPO, ".peers-venv", "bin", "mergekit-yaml")
    try:
        t = time.perf_counter()
        params = write_llama_folders(d, args.params)
        load_start = os.getloadavg()
        print(f"inputs in {d}: 3 x {params / 1e9:.2f}B params bf16 ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        runs: dict = {}
        for _ in range(args.rounds):
            for m in args.methods.split(","):
                y = os.path.join(d, f"{m}.yml")
                with open(y, "w") as f:
                    f.write(MK_YAML[m].format(d=d))
                for impl in args.impls.split(","):
                    out = os.path.join(d, f"out_{impl}_{m}")
                    shutil.rmtree(out, ignore_errors=True)
                    inputs = [os.path.join(d, f"m{k}", "model.safetensors") for k in range(3)]
                    cmd = {"ours": [sys.executable, "-m", "mtl_jax.main", "merge", "--mergekit-yaml", y, out],
                           "floor": [sys.executable, "-m", "benchmarks.merge_throughput", "--worker", "floor_files",
                                     "--out", out, "--dir", ",".join(inputs)]}.get(impl, [mergekit, y, out])
                    res = run_measured(cmd, args.timeout)
                    runs.setdefault(m, {}).setdefault(impl, []).append(res)
                    print(f"{impl:8s} {m:16s} {json.dumps(res)}", file=sys.stderr)
                    if os.path.isfile(out):
                        os.remove(out)
                    shutil.rmtree(out, ignore_errors=True)
        results = {"config": {"params": params, "inputs": 3, "dtype": "bfloat16", "cpus": os.cpu_count(),
                              "loadavg_start": load_start, "loadavg_end": os.getloadavg()}, "runs": runs}
        if args.profile:
            results["profile"] = profile_mergekit({m: os.path.join(d, f"{m}.yml") for m in args.methods.split(",")}, d)
        print(json.dumps(results, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        print(f"{params / 1e9:.2f}B params x 3 inputs, bf16; load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cpus; medians over rounds; x floor = wall / the floor's (read all inputs, write one)")
        print(f"{'method':16s} {'impl':8s} {'wall s (each round)':24s} {'cpu s':>7s} {'peak RSS GiB':>12s} {'x floor':>8s} "
              f"{'mergekit/ours':>13s} {'cpu ratio':>9s}")
        for m, by in runs.items():
            med = {i: {k: float(np.median([r[k] for r in rs if "error" not in r] or [np.nan])) for k in ("wall_s", "cpu_s")}
                   for i, rs in by.items()}
            floor = med.get("floor", {}).get("wall_s", np.nan)
            for impl, rs in by.items():
                walls = " ".join(f"{r['wall_s']:.1f}" if "error" not in r else "err" for r in rs)
                rss = max((r.get("peak_rss", 0) for r in rs), default=0) / 2**30
                mk, ours = med.get("mergekit", {}), med.get("ours", {})
                ratio = mk.get("wall_s", np.nan) / ours["wall_s"] if impl == "ours" and ours else np.nan
                cpu_ratio = mk.get("cpu_s", np.nan) / ours["cpu_s"] if impl == "ours" and ours else np.nan
                print(f"{m:16s} {impl:8s} {walls:24s} {med[impl]['cpu_s']:7.1f} {rss:12.2f} {med[impl]['wall_s'] / floor:8.2f} "
                      f"{ratio:13.2f} {cpu_ratio:9.2f}")
        if args.profile:
            print("per-phase profile of ours (one process): stats = sparsification statistics passes, output = output "
                  "passes, write wait = waiting for the writer")
            print(f"{'method':16s} {'wall s':>7s} {'cpu s':>6s} {'stats s':>7s} {'output s':>8s} {'write wait':>10s}")
            for r in results["profile"]:
                print(f"{r['method']:16s} {r['wall_s']:7.2f} {r['cpu_s']:6.2f} {r.get('stats', 0):7.2f} {r.get('output', 0):8.2f} "
                      f"{r.get('write_wait', 0):10.2f}")
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=100e6, help="parameters per model (default 100M)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--budget", type=int, default=0, help="streaming memory_budget in bytes (0: one leaf at a time)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the floor and our streaming merges")
    ap.add_argument("--peer-rounds", type=int, default=1, help="rounds of the other implementations")
    ap.add_argument("--rss-limit-gb", type=float, default=8.0, help="kill a run past this RSS (recorded as out of memory)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--dir", default="", help="reuse/keep input files here (default: a temp dir, removed)")
    ap.add_argument("--json", default="", help="also write the results JSON here")
    ap.add_argument("--profile", action="store_true",
                    help="after the runs, a per-pass profile of our merges in this process (streaming: each pass's wall, "
                         "kernel and write-wait seconds; --mergekit-yaml: stats / output / write-wait seconds)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--mergekit-yaml", action="store_true",
                    help="compare `mtl-jax merge --mergekit-yaml` with `mergekit-yaml` on 3 bf16 Llama-layout models of "
                         "--params each (default methods ties,task_arithmetic,linear; impls ours,mergekit)")
    args = ap.parse_args(argv)
    if args.mergekit_yaml:
        if args.methods == ",".join(METHODS):
            args.methods = ",".join(MK_METHODS)
        if args.impls == ",".join(IMPLS):
            args.impls = "floor,ours,mergekit"
        return mergekit_yaml_compare(args)
    if args.worker == "floor":
        return worker_floor(args.dir, args.tasks, args.out)
    if args.worker == "floor_files":
        return worker_floor_files(args.dir.split(","), args.out)
    if args.worker == "floor_mmap":
        return worker_floor_mmap(args.dir, args.tasks, args.out)
    if args.worker == "ours_mem":
        return worker_ours_mem(args.method, args.dir, args.tasks, args.out)
    if args.worker in STREAMS:
        if args.worker == "ours_stream_numpy":
            from mtl_jax.merging.streaming.kernels import NUMPY_KERNELS_ENV

            os.environ[NUMPY_KERNELS_ENV] = "1"
        return worker_ours_stream(args.method, args.dir, args.tasks, args.out, args.budget)

    d = args.dir or tempfile.mkdtemp(prefix="merge_bench_")
    os.makedirs(d, exist_ok=True)
    try:
        shapes = vit_like_shapes(args.params)
        t = time.perf_counter()
        if not os.path.exists(os.path.join(d, f"task_{args.tasks - 1}.safetensors")):
            write_models(d, shapes, args.tasks)
        model_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
        print(f"inputs in {d} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
        results: dict = {"config": {"params": model_bytes // 4, "tasks": args.tasks, "leaves": len(shapes),
                                    "budget": args.budget, "cpus": os.cpu_count(),
                                    "loadavg_start": os.getloadavg()}}
        impls = args.impls.split(",")
        out = os.path.join(d, "out.safetensors")
        runs: dict = {}

        def run(impl, m):
            cmd = command(impl, m, d, args.tasks, out, args.budget)
            if cmd is None:
                return
            warm_page_cache(d, args.tasks)
            res = run_child(cmd, int(args.rss_limit_gb * 2**30), args.timeout)
            runs.setdefault(impl, {}).setdefault(m, []).append(res)
            print(f"{impl:12s} {m:10s} {json.dumps(res)}", file=sys.stderr)
            if os.path.exists(out):
                os.remove(out)

        repeated = [i for i in FLOORS + STREAMS if i in impls]
        for _ in range(args.rounds):  # interleaved, so that load changes hit ours and the floor alike
            for impl in repeated:
                for m in (["-"] if impl in FLOORS else args.methods.split(",")):
                    run(impl, m)
        for impl in (i for i in impls if i not in repeated):
            for _ in range(args.peer_rounds):
                for m in args.methods.split(","):
                    run(impl, m)
        results.update({impl: {m: summarise(r) for m, r in ms.items()} for impl, ms in runs.items()})
        results["config"]["loadavg_end"] = os.getloadavg()
        print(json.dumps(results, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        print(table(results, model_bytes, args.tasks))
        if args.profile:
            rows = profile_streaming(d, args.tasks, [m for m in args.methods.split(",")], args.budget)
            results["profile"] = rows
            print(profile_table(rows))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
