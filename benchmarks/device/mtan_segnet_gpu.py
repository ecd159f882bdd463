"""MTAN-SegNet train-step throughput on one GPU at NYUv2's size, and the projected time of a paper run.

    python -m benchmarks.device.mtan_segnet_gpu                  # 288x384, batch 2, width 1.0: EW, Nash-MTL, UPGrad, FAMO
    python -m benchmarks.device.mtan_segnet_gpu --steps 50 --json mtan_segnet_gpu.json
    python -m benchmarks.device.mtan_segnet_gpu --smoke          # 32x32, width 1/16, 2 steps, any backend

The step is ``benchmarks.segnet_step_time``'s: the trainer's whole train step
(``build_experiment(config, dataset).train_step``) for MTAN-SegNet (``mtl_jax/models/segnet.py``) on
NYUv2's three tasks (13-class segmentation, depth, normals), Adam lr 1e-4, on one fixed batch of
random NYUv2-shaped data (images in [0, 1], 5% ignored / invalid pixels). Per method: build, compile
(timed), ``--warmup`` steps, then ``--steps`` steps timed together (one ``block_until_ready``).

Reported per method: ms per step, steps/s, images/s, and the projected wall time of the Nash-MTL /
FAMO protocol's NYUv2 run: 200 epochs x ceil(795 / batch) steps (398 at batch 2), training steps only
(no evaluation, no data loading). Methods start only while under ``--budget-s`` seconds (default
480, so the run fits in 10 minutes). Without a GPU the script refuses unless ``--smoke`` or
``--allow-cpu``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax

from benchmarks.segnet_step_time import build_step, nyuv2_like_batch, parse_size
from experiments.common import argv_or_sys, command_line

NYUV2_TRAIN_IMAGES = 795
EPOCHS = 200


def time_method(method: str, arrays: dict, width: float, warmup: int, steps: int) -> dict:
    start = time.perf_counter()
    step, state, batch = build_step(method, arrays, width)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    out = None
    for _ in range(warmup):
        state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    start = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    seconds = (time.perf_counter() - start) / steps
    size = int(arrays["image"].shape[0])
    steps_per_epoch = math.ceil(NYUV2_TRAIN_IMAGES / size)
    return {"method": method, "build_s": build_s, "compile_s": compile_s, "step_ms": 1e3 * seconds,
            "steps_per_s": 1.0 / seconds, "images_per_s": size / seconds, "steps_per_epoch": steps_per_epoch,
            "projected_hours": EPOCHS * steps_per_epoch * seconds / 3600, "applied": bool(out["applied"]),
            "losses": [round(float(v), 4) for v in jax.device_get(out["losses"])]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="288x384", help="HxW (multiples of 32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0, help="SegNet channel multiplier")
    parser.add_argument("--methods", default="ew,nash_mtl,upgrad,famo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no method after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="32x32, width 1/16, 2 steps: checks the script")
    parser.add_argument("--allow-cpu", action="store_true", help="run the full size without a GPU")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.width, args.steps, args.warmup = "32x32", 0.0625, 2, 1
    device = jax.devices()[0]
    if device.platform != "gpu" and not (args.smoke or args.allow_cpu):
        sys.exit(f"no GPU (jax sees {device.platform}: {device.device_kind}); install jax[cuda], or pass --smoke")
    height, width_px = parse_size(args.size)
    arrays = nyuv2_like_batch(args.batch, height, width_px)
    began, rows = time.perf_counter(), []
    for method in filter(None, args.methods.split(",")):
        if time.perf_counter() - began > args.budget_s:
            row = {"method": method, "skipped": f"over the {args.budget_s:.0f} s budget"}
        else:
            row = time_method(method, arrays, args.width, args.warmup, args.steps)
        rows.append(row)
        print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)
    result = {"command": command_line("benchmarks.device.mtan_segnet_gpu", argv_or_sys(argv)),
              "device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
              "size": [height, width_px], "batch": args.batch, "width": args.width, "epochs": EPOCHS,
              "train_images": NYUV2_TRAIN_IMAGES, "wall_s": time.perf_counter() - began, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n`{result['command']}` on {device.device_kind} (MTAN-SegNet width {args.width}, {height}x{width_px}, "
          f"batch {args.batch}, 3 NYUv2 tasks)\n")
    print(f"| method | step (ms) | steps/s | images/s | {EPOCHS} epochs x {math.ceil(NYUV2_TRAIN_IMAGES / args.batch)} "
          f"steps (h) | compile (s) |\n|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['method']} | n/a | n/a | n/a | n/a | {r['skipped']} |")
            continue
        print(f"| {r['method']} | {r['step_ms']:.1f} | {r['steps_per_s']:.2f} | {r['images_per_s']:.1f} | "
              f"{r['projected_hours']:.2f} | {r['compile_s']:.0f} |")
    return result


if __name__ == "__main__":
    main()
