"""Pod-scale memory and step time: a ViT-B/16 MTL model (K = 5 linear heads) on 8 devices,
{replicated, FSDP} x {fp32, bf16} x {no remat, remat}.

    python -m benchmarks.scale                                    # memory at ViT-B/16, time at ViT-Ti/16
    python -m benchmarks.scale --time-size vit_b16 --batch 8      # time at full size too (slow, ~12 GB RAM)
    python -m benchmarks.scale --memory-size tiny --time-size tiny --rounds 1   # a smoke run (~1 min)

Every configuration is one ``build_experiment`` (hard parameter sharing: ``trunks.ViT`` + 5 linear
heads of 10 classes, Adam, ``--method``) on a mesh of ``--devices`` (fake CPU devices unless
``JAX_PLATFORMS`` says otherwise), with ``sharding.fsdp``, ``remat`` and ``precision`` set per column.

Memory (per device, at ``--memory-size`` and ``--memory-batch`` global images, default 256 = 32 per
device; compiled, nothing executed): parameter bytes and train-state bytes
(parameters + optimiser moments) from the state's shardings; XLA's memory analysis of the compiled
train step: temporaries (``temp_size_in_bytes``) and the peak estimate ``arguments + outputs -
aliased (the donated state) + temporaries``. On CPU remat is compiled with
``models.remat_compiler_options`` (XLA:CPU would otherwise CSE the recomputation away; XLA:GPU keeps
it without options). Step time (at ``--time-size``, ``--batch`` global images): every column is compiled
and warmed up first, then ``--rounds`` rounds of ``--steps`` steps run interleaved over the columns
(so that a change of machine load hits them alike); the median round's time per step. The bf16
columns set ``precision=bfloat16`` when the config has that key and the trainer reads it; else they
print n/a. The "dot / conv dtypes" column counts the result dtypes of the step's dots and
convolutions as lowered (before XLA's passes): whether the precision policy reached the matmuls. Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
import json
import os
import platform
import re
import statistics
import sys
import time

if __name__ == "__main__":  # run as the benchmark: 8 fake CPU devices (imported, e.g. by device/scale_gpu.py: as is)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ["JAX_PLATFORMS"] == "cpu" and "--xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import mtl_jax.train.trainer as trainer  # noqa: E402
from experiments.common import argv_or_sys, command_line  # noqa: E402
from mtl_jax import tasks as T  # noqa: E402
from mtl_jax.config import check_config, default_config  # noqa: E402
from mtl_jax.data import from_arrays  # noqa: E402
from mtl_jax.data.pipeline import to_global  # noqa: E402
from mtl_jax.models import build_model, remat_compiler_options  # noqa: E402
from mtl_jax.train.sharding import sharded_bytes, train_state_shardings  # noqa: E402

# image side, patch, width, blocks, heads, MLP width (Dosovitskiy et al. 2021, Table 1; Touvron et al. 2021)
SIZES = {
    "vit_b16": dict(image=224, patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit_s16": dict(image=224, patch_size=16, dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_ti16": dict(image=224, patch_size=16, dim=192, depth=12, num_heads=3, mlp_dim=768),
    "tiny": dict(image=32, patch_size=8, dim=64, depth=2, num_heads=2, mlp_dim=128),
}
NUM_TASKS, NUM_CLASSES = 5, 10
GIB = 2**30


def precision_available() -> bool:
    """True when ``config.precision`` exists and ``build_experiment`` reads it (mixed precision)."""
    return "precision" in default_config() and "precision" in inspect.getsource(trainer.build_experiment)


@contextlib.contextmanager
def honouring_pod_keys(config):
    """``trainer.build_experiment`` honouring ``config.remat`` / ``config.sharding.fsdp``: when trainer.py
    does not pass them on itself, its ``build_model`` / ``train_state_shardings`` are patched meanwhile."""
    source = inspect.getsource(trainer.build_experiment)
    saved = {name: getattr(trainer, name) for name in ("build_model", "train_state_shardings")}
    try:
        if "remat" not in source:
            trainer.build_model = functools.partial(build_model, remat=config.remat)
        if "fsdp" not in source:
            trainer.train_state_shardings = functools.partial(train_state_shardings, fsdp=config.sharding.fsdp)
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)


def synthetic_dataset(size: str, n: int):
    """``n`` random uint8 images of the size's side and K = 5 ten-class labels (train and test)."""
    side = SIZES[size]["image"]
    rng = np.random.default_rng(0)
    arrays = {"image": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)}
    arrays.update({f"task_{k}": rng.integers(0, NUM_CLASSES, (n,), dtype=np.int32) for k in range(NUM_TASKS)})
    tasks = [T.classification(f"task_{k}", NUM_CLASSES) for k in range(NUM_TASKS)]
    return from_arrays(f"synthetic_{side}px", {"train": arrays, "test": arrays}, tasks, input_key="image")


def make_config(size: str, batch: int, *, fsdp: bool, bf16: bool, remat: bool, method: str = "ew",
                devices: int = -1):
    config = default_config()
    vit = {k: v for k, v in SIZES[size].items() if k != "image"}
    config.model.update(dict(name="hps", trunk="vit", head="linear"))
    config.model.trunk_kwargs.update(vit)
    config.model.head_kwargs = {}
    config.method.name = method
    config.batch_size = config.eval_batch_size = batch
    config.num_steps = 100
    config.mesh.data = devices
    config.sharding.fsdp = fsdp
    config.remat = remat
    if bf16:
        config.precision = "bfloat16"
    config.checkpoint.enabled = False
    config.progress_bar = False
    check_config(config)
    return config


def build(config, dataset):
    with honouring_pod_keys(config):
        return trainer.build_experiment(config, dataset)


def abstract_inputs(exp, batch: int):
    """(state, batch) as sharded ShapeDtypeStructs: what the train step is lowered with."""
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), exp.abstract_state,
                         exp.state_shardings)
    ds = exp.dataset
    example = ds.splits["train"][0]
    keys = list(dict.fromkeys([ds.input_key] + [t.label_key for t in ds.tasks]))
    data = {k: jax.ShapeDtypeStruct((batch,) + np.shape(example[k]), np.asarray(example[k]).dtype,
                                    sharding=exp.data_sharding) for k in keys}
    return state, data


def real_batch(exp, batch: int) -> dict:
    ds = exp.dataset
    keys = list(dict.fromkeys([ds.input_key] + [t.label_key for t in ds.tasks]))
    return to_global({k: np.stack([ds.splits["train"][i][k] for i in range(batch)]) for k in keys},
                     exp.data_sharding)


def compile_step(exp, config, batch: int, with_dtypes: bool = False):
    """The train step compiled for ``batch`` (remat's CPU options when ``config.remat``); with
    ``with_dtypes`` also ``{dtype: count}`` of the result dtypes of its dots and convolutions before
    XLA's passes (what the precision policy made of the matmuls)."""
    state, data = abstract_inputs(exp, batch)
    lowered = exp.train_step.lower(state, data)
    compiled = lowered.compile(remat_compiler_options(config.remat))
    if not with_dtypes:
        return compiled
    text = lowered.as_text()
    dtypes = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*-> tensor<[^>\n]*?x?([a-z]+[0-9]+)>", text)
    return compiled, dict(collections.Counter(dtypes))


def count_params(abstract_params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params)))


def memory_row(size: str, batch: int, method: str, devices: int, **flags) -> dict:
    config = make_config(size, batch, method=method, devices=devices, **flags)
    exp = build(config, synthetic_dataset(size, batch))
    start = time.perf_counter()
    compiled, matmul_dtypes = compile_step(exp, config, batch, with_dtypes=True)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = sharded_bytes(exp.abstract_state.params, exp.state_shardings.params)
    opt = sharded_bytes(exp.abstract_state.opt_state, exp.state_shardings.opt_state)
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {"param_count": count_params(exp.abstract_state.params), "param_bytes_per_device": params,
            "train_state_bytes_per_device": params + opt, "temp_bytes_per_device": int(mem.temp_size_in_bytes),
            "argument_bytes_per_device": int(mem.argument_size_in_bytes),
            "output_bytes_per_device": int(mem.output_size_in_bytes),
            "alias_bytes_per_device": int(mem.alias_size_in_bytes), "peak_bytes_per_device": int(peak),
            "xla_flops_per_device": float((cost or {}).get("flops", float("nan"))),
            "matmul_result_dtypes": matmul_dtypes, "compile_s": time.perf_counter() - start}


class StepTimer:
    """One column's compiled step at the timing size, with its state and batch (after one warm-up step):
    ``run(steps)`` -> seconds per step."""

    def __init__(self, size: str, batch: int, method: str, devices: int, **flags):
        config = make_config(size, batch, method=method, devices=devices, **flags)
        exp = build(config, synthetic_dataset(size, batch))
        self.step = compile_step(exp, config, batch)
        self.state, self.data = exp.init(), real_batch(exp, batch)
        self.run(1)

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, self.out = self.step(self.state, self.data)
        jax.block_until_ready((self.state, self.out))
        return (time.perf_counter() - start) / steps


def columns(bf16_ok: bool):
    """(name, flags) of the 8 columns, bf16 ones flagged unavailable when the key is missing."""
    for fsdp in (False, True):
        for bf16 in (False, True):
            for remat in (False, True):
                name = "/".join(("fsdp" if fsdp else "replicated", "bf16" if bf16 else "fp32",
                                 "remat" if remat else "no_remat"))
                yield name, dict(fsdp=fsdp, bf16=bf16, remat=remat), (bf16_ok or not bf16)


def fmt_bytes(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / GIB:.2f} GiB" if value >= GIB / 4 else f"{value / 2**20:.1f} MiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-size", default="vit_b16", choices=sorted(SIZES))
    parser.add_argument("--time-size", default="vit_ti16", choices=sorted(SIZES) + ["none"])
    parser.add_argument("--batch", type=int, default=8, help="global images per timed step")
    parser.add_argument("--memory-batch", type=int, default=256, help="global images for the memory columns "
                        "(compiled, not run; 0: --batch)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds, interleaved over the columns")
    parser.add_argument("--method", default="ew")
    parser.add_argument("--devices", type=int, default=-1, help="mesh 'data' size (-1: all devices)")
    parser.add_argument("--only", default="", help="comma list of column names (e.g. fsdp/fp32/remat)")
    parser.add_argument("--json", default="", help="also write the results JSON here")
    args = parser.parse_args(argv)
    bf16_ok = precision_available()
    only = set(filter(None, args.only.split(",")))
    memory_batch = args.memory_batch or args.batch
    rows, timers = [], {}
    for name, flags, available in columns(bf16_ok):
        if only and name not in only:
            continue
        row = {"column": name, **flags, "available": available}
        if available:
            row["memory"] = memory_row(args.memory_size, memory_batch, args.method, args.devices, **flags)
            if args.time_size != "none":
                timers[name] = StepTimer(args.time_size, args.batch, args.method, args.devices, **flags)
        rows.append(row)
        print(f"# {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    seconds = {name: [] for name in timers}
    for _ in range(args.rounds):  # interleaved: a change of machine load hits every column alike
        for name, timer in timers.items():
            seconds[name].append(timer.run(args.steps))
    for row in rows:
        if row["column"] in timers:
            ms = 1e3 * statistics.median(seconds[row["column"]])
            row["time"] = {"step_ms": ms, "images_per_s": args.batch / ms * 1e3, "rounds_ms": [
                round(1e3 * t, 1) for t in seconds[row["column"]]], "applied": bool(timers[row["column"]].out["applied"])}
    result = {"command": command_line("benchmarks.scale", argv_or_sys(argv)),
              "memory_size": {"name": args.memory_size, **SIZES[args.memory_size]},
              "time_size": None if args.time_size == "none" else {"name": args.time_size, **SIZES[args.time_size]},
              "tasks": NUM_TASKS, "method": args.method, "global_batch": args.batch, "memory_batch": memory_batch,
              "steps": args.steps, "rounds": args.rounds,
              "devices": jax.device_count(), "platform": jax.devices()[0].platform,
              "device_kind": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "host": platform.node(),
              "precision_available": bf16_ok, "loadavg_end": os.getloadavg(), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n`{result['command']}` ({jax.device_count()} {result['platform']} devices; memory: "
          f"{args.memory_size}, batch {memory_batch}; time: {args.time_size}, batch {args.batch})\n")
    print("| sharding | precision | remat | params / device | train state / device | XLA temp / device | "
          "peak / device | dot / conv dtypes | step (ms) | images/s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sharding, precision, remat = r["column"].split("/")
        m, t = r.get("memory", {}), r.get("time", {})
        step = f"{t['step_ms']:.0f}" if t else "n/a"
        dtypes = ", ".join(f"{n} {k}" for k, n in sorted(m.get("matmul_result_dtypes", {}).items())) or "n/a"
        ips = f"{t['images_per_s']:.1f}" if t else "n/a"
        print(f"| {sharding} | {precision} | {remat.replace('_', ' ')} | {fmt_bytes(m.get('param_bytes_per_device'))} "
              f"| {fmt_bytes(m.get('train_state_bytes_per_device'))} | {fmt_bytes(m.get('temp_bytes_per_device'))} | "
              f"{fmt_bytes(m.get('peak_bytes_per_device'))} | {dtypes} | {step} | {ips} |")


if __name__ == "__main__":
    main()
