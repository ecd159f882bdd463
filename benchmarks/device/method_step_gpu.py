"""The exact Gramian methods' train step against TorchJD on the same GPU, K = 10 and 40 tasks.

    python -m benchmarks.device.method_step_gpu                      # K = 10, 40; the exact Gramian methods
    python -m benchmarks.device.method_step_gpu --methods ew,upgrad,mgda --tasks 40 --rounds 5
    python -m benchmarks.device.method_step_gpu --smoke              # CPU, K = 3, two methods, one round

The table of ``benchmarks/method_step_time.py`` (same model: MLP 784-512-512 + K linear heads,
batch 256, Adam; same interleaved rounds, same FLOP floor of the layer-wise Gramian step at the
GEMM rate measured in the same rounds) with our step on JAX's default device and TorchJD's
(``benchmarks/peers/torchjd_step.py``, ``mtl_backward`` + ``jac_to_grad``) on the GPU torch sees
(``--torch-device``, default ``cuda``), driven as a peer process by ``--torch-python`` (default:
``.peers-venv/bin/python`` when it exists, else this interpreter).

When that interpreter has no torch, or its torch has no CUDA while JAX runs on a GPU, the script
says so on stderr and times ours only (TorchJD on the CPU would not be a comparison). TorchJD
aggregators that need extras (UPGrad, DualProj, CAGrad, Nash-MTL: ``torchjd[full]``) are listed as
failed when missing. It stops starting new K values after ``--budget-s`` seconds (default 500): it
fits in 10 minutes. Without a GPU the script refuses unless ``--smoke`` or ``--allow-cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import jax

from benchmarks import method_step_time as bench
from benchmarks.torch_peer import ROOT, TorchPeer, print_json

DEFAULT_METHODS = ("ew",) + bench.EXACT_GRAMIAN


def torch_status(python: str, device: str) -> tuple[bool, str]:
    """(usable, why): whether ``python`` imports torch and, for a CUDA ``device``, sees a GPU."""
    if not os.path.exists(python):
        return False, f"no python at {python}"
    probe = ("import json, torch; print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.cuda.is_available(), 'name': torch.cuda.get_device_name(0) "
             "if torch.cuda.is_available() else ''}))")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{python} failed: {e}"
    if out.returncode != 0:
        return False, f"torch does not import under {python}: {out.stderr.strip().splitlines()[-1:]}"
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if device.startswith("cuda") and not info["cuda"]:
        return False, f"torch {info['torch']} under {python} sees no CUDA device"
    return True, f"torch {info['torch']} on {info['name'] or device}"


class DevicePeer:
    """A ``TorchPeer`` whose ``setup`` commands carry the torch device."""

    def __init__(self, peer: TorchPeer, device: str):
        self.peer, self.device = peer, device

    def ask(self, **cmd) -> dict:
        if cmd.get("cmd") == "setup":
            cmd["device"] = self.device
        return self.peer.ask(**cmd)

    def close(self) -> None:
        self.peer.close()


def bench_args(args) -> argparse.Namespace:
    """The options ``method_step_time.bench_k`` reads."""
    return argparse.Namespace(target_ms=args.target_ms, min_steps=args.min_steps, seed=0, pieces=False,
                              profile=False, profile_methods="", profile_top=0, group_size=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--tasks", default="10,40")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target-ms", type=float, default=200.0, help="time per implementation per round")
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--torch-python", default="", help="python with torch + torchjd (default: .peers-venv's)")
    parser.add_argument("--torch-device", default="cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch CPU threads")
    parser.add_argument("--budget-s", type=float, default=500.0)
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU")
    parser.add_argument("--smoke", action="store_true", help="CPU, K = 3, ew and upgrad, one round")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args(argv)
    if args.smoke:
        args.methods, args.tasks, args.rounds, args.target_ms, args.min_steps = "ew,upgrad", "3", 1, 20.0, 1
        args.torch_device = "cpu"
    backend = jax.default_backend()
    if backend != "gpu" and not (args.smoke or args.allow_cpu):
        parser.error(f"JAX's backend is '{backend}', not a GPU: pass --smoke or --allow-cpu to run anyway")
    methods = ["ew"] + [m for m in args.methods.split(",") if m and m != "ew"]
    unknown = [m for m in methods if m not in bench.METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {sorted(bench.METHODS)}")

    python = args.torch_python or next((p for p in (os.path.join(ROOT, ".peers-venv", "bin", "python"), sys.executable)
                                        if os.path.exists(p)), sys.executable)
    usable, why = torch_status(python, args.torch_device)
    print(f"torch peer: {why}" if usable else f"TorchJD NOT timed ({why}): timing ours only", file=sys.stderr)
    peer = (DevicePeer(TorchPeer("torchjd_step.py", python, args.threads, stderr=None), args.torch_device)
            if usable else None)
    start, results = time.perf_counter(), []
    try:
        for k in [int(v) for v in args.tasks.split(",")]:
            if results and time.perf_counter() - start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: K = {k} not run", file=sys.stderr)
                break
            results.append(bench.bench_k(k, args.rounds, methods, bench_args(args), peer))
            with contextlib.redirect_stdout(sys.stderr):
                bench.print_tables(results[-1:])
            bench.free_executables()
    finally:
        if peer is not None:
            peer.close()
    out = {"jax_backend": backend, "jax_device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "torch_peer": why, "torch_device": args.torch_device if usable else None,
           "load_average": os.getloadavg(), "wall_s": time.perf_counter() - start, "results": results}
    print_json(out, args.json_out)
    bench.print_tables(results)


if __name__ == "__main__":
    main()
