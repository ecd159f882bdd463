"""Text multi-task learning on Wikipedia vital articles with MiniLM-L6: MTL methods vs single-task.

    python -m experiments.wiki_text_mtl --mode=frozen                 # frozen encoder, 3 seeds
    python -m experiments.wiki_text_mtl --mode=finetune --seeds=0 --config.num_epochs=1

Trains ``configs/wiki_minilm.py`` (``:frozen`` for ``--mode=frozen``) with every method of ``--methods``
and, per task, a single-task run of the same config and budget (``:task=<name>``), each seed; every run
cached by ``common.train_cached`` (a stopped sweep resumes). Reports each task's main metric (accuracy;
MAE for the regression task), mean +- std over seeds, and Delta-m% against the single-task runs
(Maninis et al. 2019; lower is better), to ``experiments/results/wiki_text_mtl_<mode>.{md,json}``.

Gradient-aggregation methods (UPGrad, Nash-MTL) fine-tuning the whole encoder use the per-task
gradients at the shared representation (``jacobian.level='representation'``, MGDA-UB's
approximation): at the parameter level they would need one backward pass through the encoder per
task.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import common
from mtl_jax.config import load_config
from mtl_jax.data import get_dataset
from mtl_jax.train.methods import METHODS
from mtl_jax.train.reporting import delta_m
from mtl_jax.train.trainer import total_steps

CONFIG = os.path.join(common.CONFIGS, "wiki_minilm.py")
METHODS_DEFAULT = "ew,db_mtl,stch,uw,upgrad,nash_mtl,famo"
REPRESENTATION_LEVEL = ("upgrad", "nash_mtl")  # per-task gradients at the representation when fine-tuning


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("frozen", "finetune"), default="frozen")
    parser.add_argument("--methods", default=METHODS_DEFAULT)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default="runs/wiki_text_mtl")
    parser.add_argument("--out", default="")
    args, rest = parser.parse_known_args(common.argv_or_sys(argv))
    overrides = common.config_overrides(parser, rest)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")
    arg = "frozen=true" if args.mode == "frozen" else ""
    config_arg = f"{CONFIG}:{arg}" if arg else CONFIG
    out = args.out or os.path.join(common.RESULTS, f"wiki_text_mtl_{args.mode}")
    workdir = os.path.join(args.workdir, args.mode)
    config = load_config(config_arg, overrides)
    tasks = get_dataset(config.data).tasks
    main_metric = {t.name: t.metrics[0] for t in tasks}

    single = {t.name: [] for t in tasks}
    for seed in seeds:
        for task in tasks:
            task_arg = f"{CONFIG}:{arg + ',' if arg else ''}task={task.name}"
            res = common.train_cached(task_arg, overrides + [f"seed={seed}"],
                                      os.path.join(workdir, f"stl_{task.name}_s{seed}"))
            single[task.name].append(res[task.name])
    baselines = {t: {main_metric[t]: float(np.mean([r[main_metric[t]] for r in runs]))} for t, runs in single.items()}

    rows, runs = [], {}
    for method in methods:
        extra = [f"method.name='{method}'"]
        if args.mode == "finetune" and method in REPRESENTATION_LEVEL:
            extra.append("jacobian.level='representation'")
        results = [common.train_cached(config_arg, overrides + [f"seed={seed}"] + extra,
                                       os.path.join(workdir, f"{method}_s{seed}")) for seed in seeds]
        runs[method] = results
        rows.append((method, [[r[t.name][main_metric[t.name]] for r in results] for t in tasks],
                     [delta_m(r, baselines, tasks) for r in results]))
        report = write_report(out, args, rest, config, tasks, main_metric, single, rows, runs, len(methods))
    print(report)


def write_report(out: str, args, rest, config, tasks, main_metric, single, rows, runs, total: int) -> str:
    """``out``.md / .json with the rows so far (rewritten after every method)."""
    scale = {t.name: 100.0 if main_metric[t.name] == "accuracy" else 1.0 for t in tasks}
    fmt = lambda name, values: common.mean_std(values, scale=scale[name])  # noqa: E731
    header = "| method | " + " | ".join(f"{t.name} {main_metric[t.name]}" for t in tasks) + " | Δm% (lower is better) |"
    lines = [f"### Wikipedia vital articles, MiniLM-L6 {'frozen' if args.mode == 'frozen' else 'fine-tuned'}: "
             f"MTL methods vs single-task (seeds {args.seeds})", "",
             caption(args.mode, config), "", header, "|" + "---|" * (len(tasks) + 2),
             "| single-task | " + " | ".join(fmt(t.name, [r[main_metric[t.name]] for r in single[t.name]])
                                            for t in tasks) + " | 0 |"]
    for method, values, deltas in rows:
        lines.append(f"| {method} | " + " | ".join(fmt(t.name, v) for t, v in zip(tasks, values))
                     + f" | {common.mean_std(deltas)} |")
    command = [f"--mode={args.mode}", f"--methods={args.methods}", f"--seeds={args.seeds}"] + list(rest)
    partial = "" if len(rows) == total else f"partial: {len(rows)} of {total} methods"
    lines += ["", common.produced_by(__spec__.name, command, partial)]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    common.write_text(out + ".md", text + "\n")
    common.write_json(out + ".json", {"single_task": single, "mtl": runs}, indent=2)
    return text


def caption(mode: str, config) -> str:
    """The setting in words: data, model, budget."""
    steps = total_steps(config, 8077)
    model = ("all-MiniLM-L6-v2 frozen (mean-pooled features computed once), a shared 2-layer MLP (384-384) "
             "and linear heads" if mode == "frozen" else
             "all-MiniLM-L6-v2 fine-tuned (mean pooling) with linear heads")
    return (f"8,077 / 949 train / test articles (English extracts, first {config.data.max_len} MiniLM tokens); "
            f"six tasks (topic 11-way, core 2-way, description head 24-way, nationality 12-way on people, "
            f"in_french 2-way, mentions regression: MAE); {model}; {steps} steps of batch {config.batch_size}, "
            f"{config.optim.name} lr {config.optim.lr:g}. Single-task rows train the same config on one task. "
            "No paper reports this benchmark: it is ours (the seed papers' text tables use GLUE-scale "
            "corpora and larger encoders).")


if __name__ == "__main__":
    common.run_main(main)
