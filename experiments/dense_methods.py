"""The dense-prediction methods table on rendered indoor scenes: every MTL method with and without F-MTL,
Rep-MTL, and single-task baselines, MTAN-SegNet at reduced width, over seeds.

    python -m experiments.dense_methods                              # the table (seed-major, resumable)
    python -m experiments.dense_methods --seeds=0 --methods=ew,famo --config-arg=steps=100  # config defaults, 100 steps
    python -m experiments.dense_methods --smoke                      # seconds per run (tests)

By default every run uses ``CPU_SCALE`` (32x64 images, 1,000 train, width 0.125, 120 steps of 8).

Every run trains configs/rendered_scenes_mtan.py (``--config-arg`` is its ``:arg``; ``--config.*``
overrides apply to every run), cached by ``common.train_cached`` under ``--workdir`` so a stopped sweep
resumes; seeds run in order (every variant of seed 0 first, then seed 1, ...), and the report is
rewritten after every run, so a partial sweep leaves a table of what finished. Rows:

* each method of ``--methods`` with each ``--sharpness`` kind ('' plain, 'fmtl' F-MTL, rho ``--rho``);
* Rep-MTL (its regularisers on equal weighting, lambda_tsr = lambda_csa = each ``--rep-mtl`` weight).
  Rep-MTL needs one shared representation (the shared decoder's feature map); MTAN has none (every task
  attends to the shared features with its own masks), so Rep-MTL rows train ``segnet_split`` (SegNet hard
  parameter sharing, the same width), beside an EW row of that model to compare with;
* single-task: the same config with one task (``:task=<name>``): MTAN-SegNet with one task's attention.

Every metric of the three tasks is reported (mean +- std over seeds), and Delta-m% over all nine metrics
(``reporting.delta_m``, Nash-MTL's average; lower is better) against the mean of the single-task runs.
Writes experiments/results/dense_methods.{md,json}.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import common
from experiments.architectures import enable_compile_cache, error_text
from mtl_jax.config import load_config
from mtl_jax.data.rendered_scenes import rendered_scenes_tasks
from mtl_jax.train.methods import METHODS
from mtl_jax.train.reporting import delta_m

CONFIG = os.path.join(common.CONFIGS, "rendered_scenes_mtan.py")
METHODS_DEFAULT = "ew,uw,dwa,db_mtl,stch,famo,mgda,pcgrad,cagrad,nash_mtl,upgrad,aligned_mtl,imtl"
REP_MTL_MODEL = "segnet_split"
# (metric, header, scale) in table order: the nine NYUv2 metrics.
COLUMNS = (("segmentation", "miou", "mIoU", 100), ("segmentation", "pixel_accuracy", "pix acc", 100),
           ("depth", "abs_err", "abs err", 1), ("depth", "rel_err", "rel err", 1),
           ("normal", "angle_mean", "angle mean", 1), ("normal", "angle_median", "angle median", 1),
           ("normal", "within_11_25", "11.25°", 100), ("normal", "within_22_5", "22.5°", 100),
           ("normal", "within_30", "30°", 100))
# The scale the table runs at on a shared 2-core CPU (the config's own defaults are 64x96, 5,000 images,
# width 0.25, 3,000 steps of 16): compiling each method's step dominates a run at this size.
CPU_SCALE = "height=32,width=64,num_train=1000,num_test=200,steps=120,model_width=0.125,batch=8"
PROTOCOL = ("NYUv2 in the MTAN / Nash-MTL protocol: 795 train / 654 test images at 288x384, MTAN-SegNet at full "
            "width (44.2M parameters), Adam 1e-4 (halved at epoch 100), batch 2, 200 epochs (~79,500 steps)")


def plan_runs(methods, kinds, rep_weights, seeds) -> list[tuple]:
    """(seed, row, run name, config ``:arg`` extra, overrides) of every run, seed-major: the single-task
    runs, each method x sharpness kind, then the Rep-MTL rows (and their architecture's EW row)."""
    runs = []
    for seed in seeds:
        for task in [t.name for t in rendered_scenes_tasks()]:
            runs.append((seed, f"single/{task}", f"stl_{task}_s{seed}", f"task={task}", []))
        for method in methods:
            for kind in kinds:
                runs.append((seed, f"{method}/{kind or 'plain'}", f"{method}_{kind or 'plain'}_s{seed}", "",
                             [f"method.name='{method}'", f"sharpness.kind='{kind}'"]))
        if rep_weights:
            split = [f"model.name='{REP_MTL_MODEL}'", "method.name='ew'"]
            runs.append((seed, f"ew/{REP_MTL_MODEL}", f"ew_{REP_MTL_MODEL}_s{seed}", "", split))
            for weight in rep_weights:
                variant = f"{REP_MTL_MODEL}_repmtl{weight:g}"
                runs.append((seed, f"ew/{variant}", f"ew_{variant}_s{seed}", "",
                             split + [f"rep_mtl.tsr_weight={weight}", f"rep_mtl.csa_weight={weight}"]))
    return runs


def row_label(row: str) -> tuple[str, str]:
    """('method', 'variant') cells of a row key."""
    method, variant = row.split("/")
    if variant.startswith(REP_MTL_MODEL):
        weight = variant[len(REP_MTL_MODEL) + len("_repmtl"):]
        return method, "SegNet HPS" + (f" + Rep-MTL λ={weight}" if weight else "")
    return method, {"plain": "-", "fmtl": "F-MTL"}.get(variant, variant)


def summarise(results: dict, tasks) -> tuple[dict, dict, dict]:
    """From ``{row: {seed: results}}``: the single-task baselines (mean over seeds), and per MTL row the
    metric lists and the Delta-m% list, in seed order."""
    single = {t.name: [r[t.name] for _, r in sorted(results.get(f"single/{t.name}", {}).items())] for t in tasks}
    if not all(single.values()):
        return {}, {}, {}
    baselines = {task: {m: float(np.mean([r[m] for r in runs])) for m in runs[0]} for task, runs in single.items()}
    metrics, deltas = {}, {}
    for row, by_seed in results.items():
        if row.startswith("single/"):
            continue
        ordered = [r for _, r in sorted(by_seed.items())]
        metrics[row] = {(t, m): [r[t][m] for r in ordered] for t, m, _, _ in COLUMNS}
        deltas[row] = [delta_m(r, baselines, tasks) for r in ordered]
    return baselines, metrics, deltas


def caption(config, seeds) -> str:
    """The setting in words, and the scale against NYUv2."""
    d = config.data
    return (f"Rendered indoor scenes (``mtl_jax.data.rendered_scenes``): {d.num_train:,} train / {d.num_test:,} test "
            f"images at {d.height}x{d.width}, 13-class segmentation, depth (m), surface normals. MTAN-SegNet at "
            f"width {config.model.arch_kwargs.width:g}, {config.num_steps} steps of batch {config.batch_size}, "
            f"{config.optim.name} lr {config.optim.lr:g} ({config.optim.schedule}), seeds {seeds}. Scale against "
            f"{PROTOCOL}: here {d.height * d.width / (288 * 384):.3f}x the pixels per image and "
            f"{config.num_steps * config.batch_size / (79_500 * 2):.3f}x the training images seen. Δm% averages "
            "the nine metrics (Nash-MTL's convention) against the single-task runs' mean over seeds; lower is "
            "better. Methods run with their defaults.")


def write_report(out: str, text_caption: str, results: dict, tasks, plan, command, failures=None) -> str:
    """``out``.md / .json with every finished run (rewritten after each) and the failed ones
    (``failures``: {run name: error})."""
    baselines, metrics, deltas = summarise(results, tasks)
    head = "| method | variant | seeds | " + " | ".join(h for _, _, h, _ in COLUMNS) + " | Δm% |"
    lines = ["### Dense MTL methods on rendered indoor scenes (MTAN-SegNet, reduced width)", "", text_caption, "",
             head, "|" + "---|" * (len(COLUMNS) + 4)]
    single_seeds = min((len(results.get(f"single/{t.name}", {})) for t in tasks), default=0)
    if baselines:
        lines.append("| single-task | - | " + f"{single_seeds} | "
                     + " | ".join(common.mean_std([baselines[t][m]], scale=s) for t, m, _, s in COLUMNS) + " | 0 |")
    for row in sorted(metrics, key=lambda r: np.mean(deltas[r])):
        method, variant = row_label(row)
        lines.append(f"| {method} | {variant} | {len(deltas[row])} | "
                     + " | ".join(common.mean_std(metrics[row][t, m], scale=s) for t, m, _, s in COLUMNS)
                     + f" | {common.mean_std(deltas[row])} |")
    done = sum(len(v) for v in results.values())
    partial = "" if done == len(plan) else f"partial: {done} of {len(plan)} runs"
    lines += ["", "Metrics: mIoU, pixel accuracy and the within-angle fractions in %, depth errors in metres "
              "(absolute) and as a fraction (relative), angles in degrees; rows sorted by Δm%.", ""]
    lines += [f"Run {name} {error}." for name, error in sorted((failures or {}).items())]
    lines += [""] * bool(failures) + [common.produced_by(__spec__.name, command, partial)]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    common.write_text(out + ".md", text + "\n")
    common.write_json(out + ".json", {"caption": text_caption, "baselines": baselines, "delta_m": deltas,
                                      "runs": results, "failures": failures or {}}, indent=2)
    return text


def main(argv=None):
    argv = common.argv_or_sys(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=METHODS_DEFAULT)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sharpness", default=",fmtl", help="comma list of sharpness kinds ('' = plain)")
    parser.add_argument("--rho", type=float, default=0.05, help="F-MTL's rho")
    parser.add_argument("--rep-mtl", default="0.9", help="comma list of Rep-MTL weights ('' = no Rep-MTL rows)")
    parser.add_argument("--config-arg", default=CPU_SCALE, help="the config's :arg ('' = its defaults)")
    parser.add_argument("--smoke", action="store_true", help="the config's :smoke (seconds per run)")
    parser.add_argument("--workdir", default="runs/dense_methods")
    parser.add_argument("--compile-cache", default="", help="jax persistent compilation cache directory (default "
                        "<workdir>/jax_cache; 'off' disables): seeds after the first load the compiled steps")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "dense_methods"))
    args, rest = parser.parse_known_args(argv)
    overrides = common.config_overrides(parser, rest) + [f"sharpness.rho={args.rho}"]
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {sorted(METHODS)}")
    if args.compile_cache != "off":
        enable_compile_cache(args.compile_cache or os.path.join(args.workdir, "jax_cache"))
    base_arg = "smoke" if args.smoke else args.config_arg
    config = load_config(f"{CONFIG}:{base_arg}" if base_arg else CONFIG, overrides)
    tasks = rendered_scenes_tasks()
    plan = plan_runs(methods, args.sharpness.split(","),
                     [float(w) for w in args.rep_mtl.split(",")] if args.rep_mtl else [], seeds)
    text_caption = caption(config, args.seeds)
    results, failures, report = {}, {}, ""
    for seed, row, name, extra_arg, extra in plan:
        arg = ",".join(filter(None, [base_arg, extra_arg]))
        common.log(f"{name}: training")
        try:
            results.setdefault(row, {})[seed] = common.train_cached(
                f"{CONFIG}:{arg}" if arg else CONFIG, overrides + [f"seed={seed}"] + extra,
                os.path.join(args.workdir, name))
        except Exception as e:  # one failing variant leaves the others' rows
            failures[name] = error_text(e)
            common.log(f"{name}: {failures[name]}")
        report = write_report(args.out, text_caption, {r: v for r, v in results.items() if v}, tasks, plan, argv,
                              failures)
    print(report)


if __name__ == "__main__":
    common.run_main(main)
