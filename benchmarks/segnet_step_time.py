"""Train-step time of MTAN-SegNet (NYUv2's three tasks): our jitted step vs the official PyTorch model.

    python -m benchmarks.segnet_step_time [--size 64x96] [--batches 2,8] [--widths 1.0,0.25]
        [--methods ew,nash_mtl] [--rounds 5] [--steps 2] [--json-out PATH]

One step, both sides, on one fixed batch of random images [B, H, W, 3] in [0, 1] with NYUv2-like labels
(13-class segmentation with 5% ignored pixels (-1), depth with 5% invalid zeros, unit normals with 5%
invalid zero vectors), the same numbers on both sides: MTAN-SegNet (``mtl_jax/models/segnet.py``; the
official lorenmt/mtan ``model_segnet_mtan.py``, at ``width`` times its 64-128-256-512-512 filters) in
train mode (BatchNorm batch statistics), the three LibMTL / MTAN losses (pixel cross-entropy ignoring
-1, depth L1 over valid pixels, 1 - cosine over valid normals), gradients, Adam (lr 1e-4).

* ours: ``build_experiment(config, dataset).train_step`` (the trainer's whole step: forward, the
  method's gradients, one Adam per parameter group, NaN guard, running metrics), ``method.name`` 'ew'
  or 'nash_mtl' (per-task gradients of the shared parameters, the Nash bargaining weights from the
  in-graph solver, max_norm 1 clipping);
* torch (``benchmarks/peers/segnet_torch_step.py`` in ``.peers-venv``, a long-lived subprocess): the
  official model transcribed (layer for layer ``model_segnet_mtan.py``, nash-mtl's ``SegNetMtan``),
  ``model.train()``, the official losses; 'ew' = sum of the losses, backward, ``torch.optim.Adam``;
  'nash_mtl' = the Nash-MTL authors' step (AvivNavon/nash-mtl ``methods/weight_methods.py``: per-task
  ``autograd.grad`` of the shared parameters (all but the heads and the attention modules), Gram
  matrix, the cvxpy/ECOS weight solver, weighted backward, ``clip_grad_norm_(shared, 1)``, Adam) when
  cvxpy is installed in the peers venv; without cvxpy, 'nash_mtl_floor': the same step with the
  solver left out (weights 1): a lower bound of the authors' step time, so ours beating it beats theirs.

The torch step runs with each count of ``--torch-threads`` (default 1 and 2): on a machine where other
processes hold the cores, torch's OpenMP barriers stall its multi-thread steps (here a 2-thread step
took 10-30x longer than a 1-thread one), so the fastest count is the reference. Rounds interleave ours
and every torch count (odd rounds in reverse order), ``--steps`` steps each per round after warm-up;
figures are the median over rounds; the ratio is fastest torch / ours (also the median of the
per-round ratios). Process CPU time per step is reported beside the wall-clock time. On a shared
machine both move with other load; the paired ratio moves least. Target: ours >= 1.3x faster, EW and
Nash-MTL. Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

from benchmarks.torch_peer import ROOT, print_json, start_peer
from mtl_jax import tasks as T
from mtl_jax.config import default_config
from mtl_jax.data import from_arrays
from mtl_jax.host_memory import glibc_tunables, reuse_freed_memory

TARGET = 1.3
LR = 1e-4
NUM_CLASSES = 13
INVALID_FRACTION = 0.05


def nyuv2_like_batch(batch: int, height: int, width: int, seed: int = 0) -> dict:
    """Random NYUv2-shaped arrays: image float32 [B, H, W, 3] in [0, 1], segmentation int64 [B, H, W]
    in -1..12, depth float32 [B, H, W, 1] (0 = invalid), normal float32 [B, H, W, 3] (unit or 0)."""
    rng = np.random.default_rng(seed)
    shape = (batch, height, width)
    segmentation = rng.integers(0, NUM_CLASSES, shape)
    segmentation[rng.random(shape) < INVALID_FRACTION] = -1
    depth = rng.uniform(0.5, 10.0, shape + (1,)).astype(np.float32)
    depth[rng.random(shape) < INVALID_FRACTION] = 0.0
    normal = rng.standard_normal(shape + (3,)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[rng.random(shape) < INVALID_FRACTION] = 0.0
    return {"image": rng.random(shape + (3,), dtype=np.float32), "segmentation": segmentation.astype(np.int64),
            "depth": depth, "normal": normal}


def dense_dataset(arrays: dict):
    """The arrays as an mtl_jax Dataset with NYUv2's tasks (segmentation 13, depth, normal)."""
    tasks = [T.segmentation("segmentation", NUM_CLASSES), T.depth("depth"), T.normal("normal")]
    return from_arrays("nyuv2_like", {"train": arrays, "test": arrays}, tasks, input_key="image")


def make_config(method: str, batch: int, width: float, model: str = "mtan_segnet"):
    """MTAN-SegNet at ``width``, ``method``, Adam lr 1e-4 (the Nash-MTL protocol's), mesh 1x1."""
    config = default_config()
    config.model.name = model
    config.model.arch_kwargs = {"width": width}
    config.method.name = method
    config.optim.name = "adam"
    config.optim.learning_rate = LR
    config.batch_size = config.eval_batch_size = batch
    config.num_steps = 1000
    config.mesh.data = config.mesh.model = 1
    config.checkpoint.enabled = False
    config.progress_bar = False
    return config


def build_step(method: str, arrays: dict, width: float, model: str = "mtan_segnet"):
    """-> ``(step, state, batch)``: the trainer's jitted train step (state donated), a fresh state and
    the batch on the device."""
    from mtl_jax.data.pipeline import to_global
    from mtl_jax.train.trainer import build_experiment

    batch = arrays["image"].shape[0]
    exp = build_experiment(make_config(method, batch, width, model), dense_dataset(arrays))
    return exp.train_step, exp.init(), to_global(dict(arrays), exp.data_sharding)


class OurSide:
    """Our step for one method; ``run(n)`` -> (wall s / step, CPU s / step)."""

    def __init__(self, method: str, arrays: dict, width: float):
        self.step, self.state, self.batch = build_step(method, arrays, width)
        start = time.perf_counter()
        self.state, out = self.step(self.state, self.batch)
        self.first_losses = [float(v) for v in jax.device_get(out["losses"])]
        self.compile_s = time.perf_counter() - start
        self.run(1)

    def run(self, steps: int) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = None
        for _ in range(steps):
            self.state, out = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, out))
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps


def time_case(peer, method: str, arrays: dict, width: float, rounds: int, steps: int,
              torch_threads: tuple = (1, 2)) -> dict:
    """One (batch, width, method) row: ours and torch at each thread count, interleaved rounds."""
    ours = OurSide(method, arrays, width)
    row = {"method": method, "batch": int(arrays["image"].shape[0]), "width": width,
           "ours_compile_s": ours.compile_s, "ours_first_losses": ours.first_losses}
    torch_impl = None
    if peer is not None:
        reply = peer.ask(cmd="setup", method=method, width=width, lr=LR,
                         **{k: v.tolist() for k, v in arrays.items()})
        if "error" in reply:
            row["torch_error"] = reply["error"]
        else:
            torch_impl = reply["impl"]
            row.update(torch_impl=torch_impl, torch_first_losses=reply["first_losses"], torch=reply["torch"],
                       torch_threads=reply["threads"])
    sides = ["ours"] + ([f"torch@{n}" for n in torch_threads] if torch_impl is not None else [])
    times = {side: [] for side in sides}
    cpu = {side: [] for side in sides}
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side == "ours":
                wall, cpu_s = ours.run(steps)
            else:
                reply = peer.ask(cmd="time", steps=steps, threads=int(side.partition("@")[2]))
                wall, cpu_s = reply["s_per_step"], reply["cpu_s_per_step"]
            times[side].append(wall)
            cpu[side].append(cpu_s)
    row["ms"] = {side: 1e3 * statistics.median(t) for side, t in times.items()}
    row["cpu_ms"] = {side: 1e3 * statistics.median(c) for side, c in cpu.items()}
    row["ours_ms"], row["ours_cpu_ms"] = row["ms"]["ours"], row["cpu_ms"]["ours"]
    if torch_impl is not None:
        fastest = min(sides[1:], key=lambda side: row["ms"][side])
        row["torch_threads_fastest"] = int(fastest.partition("@")[2])
        row["torch_ms"], row["torch_cpu_ms"] = row["ms"][fastest], row["cpu_ms"][fastest]
        row["torch_over_ours"] = row["torch_ms"] / row["ours_ms"]
        row["torch_over_ours_paired"] = statistics.median(t / o for t, o in zip(times[fastest], times["ours"]))
        row["meets_target"] = bool(row["torch_over_ours_paired"] >= TARGET)
    del ours
    return row


def print_table(out: dict) -> None:
    h, w = out["size"]
    print(f"\n### MTAN-SegNet train step, {h}x{w}, NYUv2 tasks, torch threads {out['torch_threads']} (median of "
          f"{out['rounds']} rounds x {out['steps']} steps; load average before / after "
          f"{out['load_average'][0]:.2f} / {out['load_average_after'][0]:.2f})\n")
    print("| batch | width | method | ours ms (CPU ms) | torch impl (threads) | fastest torch ms (CPU ms) | "
          "torch / ours (paired) |")
    print("|---|---|---|---|---|---|---|")
    for row in out["rows"]:
        torch_cell = (f"{row['torch_ms']:.0f} ({row['torch_cpu_ms']:.0f})" if "torch_ms" in row
                      else row.get("torch_error", "n/a"))
        ratio = (f"{row['torch_over_ours']:.2f}x ({row['torch_over_ours_paired']:.2f}x)" if "torch_ms" in row
                 else "n/a")
        print(f"| {row['batch']} | {row['width']} | {row['method']} | {row['ours_ms']:.0f} ({row['ours_cpu_ms']:.0f}) | "
              f"{row.get('torch_impl', '-')} ({row.get('torch_threads_fastest', '-')}) | {torch_cell} | {ratio} |")
    print(f"\ntarget: torch / ours >= {TARGET}x (paired ratio)")


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64x96", help="HxW, multiples of 32")
    parser.add_argument("--batches", default="2,8")
    parser.add_argument("--widths", default="1.0,0.25")
    parser.add_argument("--methods", default="ew,nash_mtl")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the torch peer's default threads")
    parser.add_argument("--torch-threads", default="1,2", help="torch thread counts timed (the fastest is the reference)")
    parser.add_argument("--torch-python", default=os.path.join(ROOT, ".peers-venv", "bin", "python"))
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json-out", default="", help="also write the JSON here")
    args = parser.parse_args()
    height, width_px = parse_size(args.size)
    torch_threads = tuple(int(n) for n in args.torch_threads.split(","))
    peer_env = {**os.environ, "GLIBC_TUNABLES": glibc_tunables()} if reuse_freed_memory() else None
    peer = start_peer("segnet_torch_step.py", args, peer_env, stderr=None)
    load_average = os.getloadavg()
    rows = []
    try:
        for batch in [int(b) for b in args.batches.split(",")]:
            arrays = nyuv2_like_batch(batch, height, width_px)
            for width in [float(w) for w in args.widths.split(",")]:
                for method in args.methods.split(","):
                    rows.append(time_case(peer, method, arrays, width, args.rounds, args.steps, torch_threads))
                    print(rows[-1], flush=True)
    finally:
        if peer is not None:
            peer.close()
    out = {"device": jax.devices()[0].platform, "cpu_count": os.cpu_count(), "jax": jax.__version__,
           "python": platform.python_version(), "size": [height, width_px], "rounds": args.rounds,
           "steps": args.steps, "torch_threads": list(torch_threads), "rows": rows, "target": TARGET,
           "load_average": load_average, "load_average_after": os.getloadavg()}
    print_json(out, args.json_out)
    print_table(out)


if __name__ == "__main__":
    main()
