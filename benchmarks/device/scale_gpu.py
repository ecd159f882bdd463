"""Throughput and model FLOPs utilisation (MFU) of the ViT-B/16 MTL train step on one GPU.

    python -m benchmarks.device.scale_gpu                    # EW and UPGrad x fp32 and bf16, K = 5 heads
    python -m benchmarks.device.scale_gpu --batch 128 --steps 20 --json scale_gpu.json
    python -m benchmarks.device.scale_gpu --dry-run          # tiny ViT, 2 steps, any backend (checks the script)

The model is ``benchmarks.scale``'s (hard parameter sharing: ViT-B/16 trunk, 224 x 224 images =
196 tokens, 5 linear heads, Adam) on a one-device mesh; each (method, precision) is compiled, run
``--warmup`` steps, then ``--steps`` steps timed together (one ``block_until_ready`` at the end).
Reported per configuration:

* images/s = batch x steps / seconds;
* MFU = model FLOPs per step x steps/s / peak, with model FLOPs = 6 N T (N parameters, T tokens
  per step: forward + backward of every weight, attention's T^2 terms not counted, ~4% at 196
  tokens) against the GPU's dense peak for the step's precision (``PEAKS``, by ``device_kind``);
* HFU = XLA's cost-analysis FLOPs of the compiled step x steps/s / the same peak (what the hardware
  ran: UPGrad's per-task Gramian, remat's recomputation and the optimiser included).

fp32 runs are also put against the TF32 peak (``mfu_vs_tf32``): XLA:GPU runs float32 dots in TF32 at
JAX's default matmul precision. The bf16 rows need ``config.precision`` (mixed precision) and print
n/a without it. The run stops starting new configurations after ``--budget-s`` seconds (default 540:
it fits in 10 minutes). Without a GPU the script refuses unless ``--dry-run`` or ``--allow-cpu``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from benchmarks import scale  # model sizes, configs, synthetic data, compile
from experiments.common import argv_or_sys, command_line

# device_kind substring -> dense peak FLOP/s (bf16, fp32, tf32), first match wins (vendor data sheets)
PEAKS = (
    ("H100 PCIe", dict(bfloat16=756e12, float32=51e12, tf32=378e12)),
    ("H100", dict(bfloat16=989e12, float32=67e12, tf32=494e12)),  # SXM (device_kind 'NVIDIA H100 80GB HBM3')
    ("H200", dict(bfloat16=989e12, float32=67e12, tf32=494e12)),
    ("GH200", dict(bfloat16=989e12, float32=67e12, tf32=494e12)),
    ("A100", dict(bfloat16=312e12, float32=19.5e12, tf32=156e12)),
)


def peaks_for(device_kind: str, override_tflops: float = 0.0) -> dict | None:
    if override_tflops:
        return dict(bfloat16=override_tflops * 1e12, float32=override_tflops * 1e12, tf32=override_tflops * 1e12)
    for key, peaks in PEAKS:
        if key in device_kind:
            return peaks
    return None


def run_config(size: str, batch: int, method: str, precision: str, remat: bool, warmup: int, steps: int) -> dict:
    config = scale.make_config(size, batch, fsdp=False, bf16=precision == "bfloat16", remat=remat, method=method,
                               devices=1)
    exp = scale.build(config, scale.synthetic_dataset(size, batch))
    start = time.perf_counter()
    compiled = scale.compile_step(exp, config, batch)
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, data, out = exp.init(), scale.real_batch(exp, batch), None
    for _ in range(warmup):
        state, out = compiled(state, data)
    jax.block_until_ready((state, out))
    start = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, data)
    jax.block_until_ready((state, out))
    seconds = time.perf_counter() - start
    sizes = scale.SIZES[size]
    tokens = batch * (sizes["image"] // sizes["patch_size"]) ** 2
    params = scale.count_params(exp.abstract_state.params)
    mem = compiled.memory_analysis()
    return {"method": method, "precision": precision, "remat": remat, "batch": batch, "steps": steps,
            "compile_s": compile_s, "step_ms": 1e3 * seconds / steps, "images_per_s": batch * steps / seconds,
            "params": params, "tokens_per_step": tokens, "model_flops_per_step": 6.0 * params * tokens,
            "xla_flops_per_step": float((cost or {}).get("flops", float("nan"))),
            "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
            "applied": bool(out["applied"]), "losses": np.asarray(out["losses"]).round(4).tolist()}


def add_utilisation(row: dict, peaks: dict | None) -> dict:
    steps_per_s = 1e3 / row["step_ms"]
    peak = None if peaks is None else peaks[row["precision"]]
    row["peak_flops"] = peak
    row["mfu"] = None if peak is None else row["model_flops_per_step"] * steps_per_s / peak
    row["hfu"] = None if peak is None else row["xla_flops_per_step"] * steps_per_s / peak
    row["mfu_vs_tf32"] = (row["model_flops_per_step"] * steps_per_s / peaks["tf32"]
                          if peaks is not None and row["precision"] == "float32" else None)
    return row


def pct(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="vit_b16", choices=sorted(scale.SIZES))
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="ew,upgrad")
    parser.add_argument("--precisions", default="bfloat16,float32")
    parser.add_argument("--remat", action="store_true", help="rematerialise the ViT blocks")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the peak FLOP/s table (TFLOP/s)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no configuration after this")
    parser.add_argument("--dry-run", action="store_true", help="tiny ViT, batch 8, 2 steps: checks the script")
    parser.add_argument("--allow-cpu", action="store_true", help="run the full sizes without a GPU")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.size, args.batch, args.steps, args.warmup = "tiny", 8, 2, 1
    device = jax.devices()[0]
    if device.platform != "gpu" and not (args.dry_run or args.allow_cpu):
        sys.exit(f"no GPU (jax sees {device.platform}: {device.device_kind}); install jax[cuda], or pass --dry-run")
    peaks = peaks_for(device.device_kind, args.peak_tflops)
    bf16_ok = scale.precision_available()
    began, rows = time.perf_counter(), []
    for method in filter(None, args.methods.split(",")):
        for precision in filter(None, args.precisions.split(",")):
            row = {"method": method, "precision": precision, "remat": args.remat, "batch": args.batch}
            if precision == "bfloat16" and not bf16_ok:
                row["skipped"] = "config.precision not available"
            elif time.perf_counter() - began > args.budget_s:
                row["skipped"] = f"over the {args.budget_s:.0f} s budget"
            else:
                row = add_utilisation(run_config(args.size, args.batch, method, precision, args.remat, args.warmup,
                                                 args.steps), peaks)
            rows.append(row)
            print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)
    result = {"command": command_line("benchmarks.device.scale_gpu", argv_or_sys(argv)),
              "device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "size": {"name": args.size, **scale.SIZES[args.size]}, "tasks": scale.NUM_TASKS,
              "peaks": peaks, "wall_s": time.perf_counter() - began, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n`{result['command']}` on {device.device_kind} ({args.size}, batch {args.batch}, K = {scale.NUM_TASKS})\n")
    print("| method | precision | step (ms) | images/s | MFU (6NT) | HFU (XLA FLOPs) | MFU vs TF32 | compile (s) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['method']} | {r['precision']} | n/a | n/a | n/a | n/a | n/a | {r['skipped']} |")
            continue
        print(f"| {r['method']} | {r['precision']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | {pct(r['mfu'])} | "
              f"{pct(r['hfu'])} | {pct(r['mfu_vs_tf32'])} | {r['compile_s']:.0f} |")


if __name__ == "__main__":
    main()
