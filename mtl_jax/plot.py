"""Figures: a run's per-task learning curves, the methods table as a Delta-m% bar chart, and
merge-coefficient heatmaps.

    mtl-jax plot WORKDIR [--out FILE]       # <WORKDIR>/learning_curves.png: every task's metrics per step
    python -m mtl_jax.plot WORKDIR           # the same
    python -m mtl_jax.plot --docs            # the documentation's figures, into docs/results/img/

A run's workdir holds ``metrics.jsonl`` (``mtl_jax.train.reporting.MetricWriter``): one JSON object
per line, ``{"step", "split", "<task>/<metric>": value, ...}``, ``split`` being ``"train"`` (window
averages of the training batches) or the evaluation split (``config.eval_split``); a non-finite value
is ``null``. A resumed run appends to the file, so a step can appear twice; the later line wins.

Figures are drawn with matplotlib's object API (no pyplot state, no display needed) and written
through a temporary sibling renamed into place. matplotlib is in the ``experiments`` extra
(``pip install -e '.[experiments]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from typing import Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
RUN_FIGURE = "learning_curves.png"
TRAIN_SPLIT = "train"
DOCS_IMG_DIR = os.path.join("docs", "results", "img")
RESULTS_DIR = os.path.join("experiments", "results")
# The methods table's runs (same single-task baselines): plain and F-MTL rows of every method.
METHODS_RESULTS = ("multimnist_methods.json", "multimnist_methods_fmtl_rest.json")
# Learned-merge rows of the merging benchmark's results whose coefficients get a heatmap, when the
# results hold them (``results[seed][row]["coefficients"]``: [T] or [T, G]).
LEARNED_MERGE_ROWS = ("AdaMerging (task-wise)", "AdaMerging (layer-wise)", "AdaMerging++ (layer-wise)", "aTLAS")
SPLIT_STYLES = {TRAIN_SPLIT: dict(color="tab:blue", linewidth=1.2)}
EVAL_STYLE = dict(color="tab:orange", marker="o", markersize=3, linewidth=1.2)
FEW_POINTS = 30  # a curve with fewer points also gets markers (a one-point curve is otherwise invisible)


def _figure(**kwargs):
    """A matplotlib ``Figure`` not registered with pyplot (so no GUI backend is touched)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("matplotlib is not installed: pip install -e '.[experiments]'") from None
    return Figure(**kwargs)


def _save(fig, path: str) -> str:
    """Writes ``fig`` as a PNG to ``path`` through a temporary sibling renamed into place; returns ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metrics(workdir: str) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The per-task curves of a run: ``{split: {"<task>/<metric>": (steps [N], values [N])}}``.

    Only ``<task>/<metric>`` keys are kept (not ``steps_per_sec``, ``nonfinite_total``, ``delta_m``);
    steps are sorted, a step logged twice (a resumed run) keeps its last line, and ``null`` (a
    non-finite value) becomes NaN. An unreadable last line (a run killed mid-write) is skipped.

    Raises:
      FileNotFoundError: ``workdir`` or its ``metrics.jsonl`` does not exist.
      ValueError: a line other than the last is not a JSON object with ``step`` and ``split``.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {workdir!r}: not a workdir of `mtl-jax train`, or the run "
                                f"has not logged yet")
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows: dict[str, dict[int, dict]] = {}
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            split, step = row.pop("split"), int(row.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a metrics line (a JSON object with 'step' and 'split'): "
                             f"{line[:80]!r}") from None
        rows.setdefault(split, {})[step] = row
    curves = {}
    for split, by_step in rows.items():
        steps = sorted(by_step)
        names = sorted({k for row in by_step.values() for k in row if "/" in k})
        curves[split] = {name: (np.array([s for s in steps if name in by_step[s]]),
                                np.array([_as_float(by_step[s][name]) for s in steps if name in by_step[s]]))
                         for name in names}
    return curves


def _as_float(value) -> float:
    return math.nan if value is None else float(value)


def _task_metrics(curves: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """``{task: [metric, ...]}`` in order of first appearance over the splits (train first)."""
    out: dict[str, list[str]] = {}
    for split in sorted(curves, key=lambda s: s != TRAIN_SPLIT):
        for name in curves[split]:
            task, metric = name.rsplit("/", 1)
            if metric not in out.setdefault(task, []):
                out[task].append(metric)
    return out


def _run_title(workdir: str) -> str:
    title = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    try:
        with open(os.path.join(workdir, RESULTS_FILE)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return title
    parts = [title, f"{summary.get('steps', '?')} steps"]
    if summary.get("delta_m") is not None:
        parts.append(f"Δm% {summary['delta_m']:+.2f} vs single-task")
    return ", ".join(parts)


def plot_run(workdir: str, out: str | None = None) -> str:
    """Per-task learning curves of a run: one panel per task (rows) and metric (columns), the
    training window averages as a line and each evaluation as dots, step on the x axis.

    Args:
      workdir: a ``mtl-jax train`` workdir (holding ``metrics.jsonl``; ``results.json``, when
        present, puts the step count and Delta-m% in the title).
      out: the PNG's path; default ``<workdir>/learning_curves.png``.

    Returns:
      The path of the PNG written.

    Raises:
      FileNotFoundError: no workdir or no ``metrics.jsonl`` in it.
      ValueError: the file holds no per-task metric yet, or a malformed line.
    """
    curves = read_metrics(workdir)
    tasks = _task_metrics(curves)
    if not tasks:
        raise ValueError(f"{os.path.join(workdir, METRICS_FILE)} holds no per-task metric ('<task>/<metric>') yet")
    columns = max(len(m) for m in tasks.values())
    fig = _figure(figsize=(3.6 * columns, 2.5 * len(tasks) + 0.6), layout="constrained")
    axes = fig.subplots(len(tasks), columns, squeeze=False)
    for row, (task, metrics) in enumerate(tasks.items()):
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(metrics):
                ax.set_visible(False)
                continue
            name = f"{task}/{metrics[col]}"
            for split in sorted(curves, key=lambda s: s != TRAIN_SPLIT):
                if name in curves[split]:
                    steps, values = curves[split][name]
                    style = dict(SPLIT_STYLES.get(split, EVAL_STYLE))
                    if len(steps) < FEW_POINTS:
                        style.setdefault("marker", ".")
                    ax.plot(steps, values, label=split, **style)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if metrics[col] == "loss" and _spans_decade(curves, name):
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_run_title(workdir), fontsize=11)
    return _save(fig, out or os.path.join(workdir, RUN_FIGURE))


def _spans_decade(curves, name: str) -> bool:
    """Whether the finite values of ``name`` are positive and span a factor of 10 (a log axis helps)."""
    values = [v for split in curves.values() if name in split for v in split[name][1] if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) >= 10 * min(values)


def methods_delta_m(results: Mapping, metric: str = "accuracy") -> dict[tuple[str, str], np.ndarray]:
    """Per-seed Delta-m% of every row of a methods-table result (``experiments.multimnist_methods``'s
    JSON: ``{"baselines": {task: {metric: b}}, "mtl": {"<method>/<plain|fmtl>": [{task: {metric: m}}
    per seed]}}``): ``{(method, variant): [seeds]}``, with ``mtl_jax.train.reporting.delta_m``
    (Maninis et al. 2019) against the mean single-task baselines."""
    from mtl_jax.tasks import TaskSpec
    from mtl_jax.train.reporting import delta_m

    tasks = [TaskSpec(name=t, kind="classification", num_outputs=1, metrics=(metric,)) for t in results["baselines"]]
    out = {}
    for key, seeds in results["mtl"].items():
        method, variant = key.split("/", 1)
        out[method, variant] = np.array([delta_m(run, results["baselines"], tasks) for run in seeds])
    return out


def load_methods_results(paths: Sequence[str]) -> dict:
    """The methods-table JSON files merged into one: their ``mtl`` rows together (a row in a later
    file replaces the same row of an earlier one). ValueError when their baselines differ (their
    Delta-m% would not be comparable)."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        if merged and results["baselines"] != merged["baselines"]:
            raise ValueError(f"{path}: single-task baselines {results['baselines']} differ from "
                             f"{paths[0]}'s {merged['baselines']}")
        merged.setdefault("baselines", results["baselines"])
        merged.setdefault("mtl", {}).update(results["mtl"])
    return merged


VARIANT_LABELS = {"plain": "plain", "fmtl": "+ F-MTL"}
VARIANT_COLORS = {"plain": "tab:blue", "fmtl": "tab:orange"}


def plot_methods(results: Mapping, out: str, title: str = "") -> str:
    """The methods table as a horizontal bar chart: mean Delta-m% per method and variant (plain,
    + F-MTL), the seeds' standard deviation as error bars and each seed as a dot; methods sorted
    by their plain mean (best, i.e. lowest, on top). Returns ``out``."""
    deltas = methods_delta_m(results)
    methods = sorted({m for m, _ in deltas}, key=lambda m: float(np.mean(deltas.get((m, "plain"), [np.inf]))))
    variants = [v for v in VARIANT_LABELS if any((m, v) in deltas for m in methods)]
    variants += sorted({v for _, v in deltas} - set(variants))
    height = 0.8 / len(variants)
    fig = _figure(figsize=(7.5, 0.2 * len(methods) * len(variants) + 1.2), layout="constrained")
    ax = fig.subplots()
    for i, variant in enumerate(variants):
        rows = [(y, deltas[m, variant]) for y, m in enumerate(methods) if (m, variant) in deltas]
        ys = np.array([y for y, _ in rows]) + (i - (len(variants) - 1) / 2) * height
        means = [float(np.mean(v)) for _, v in rows]
        stds = [float(np.std(v)) for _, v in rows]
        color = VARIANT_COLORS.get(variant, f"C{i + 2}")
        ax.barh(ys, means, height=height * 0.9, xerr=stds, color=color, alpha=0.75, capsize=2,
                label=VARIANT_LABELS.get(variant, variant))
        for y, (_, values) in zip(ys, rows):
            ax.scatter(values, np.full(len(values), y), s=6, color="black", zorder=3)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.set_ylim(len(methods) - 0.5, -0.5)  # best on top, no empty margin
    ax.axvline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("Δm% vs single-task (lower is better); bar: mean, whisker: std, dots: seeds")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")  # the bottom rows (MoCo) reach the right edge
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out)


def plot_merge_coefficients(coefficients, tasks: Sequence[str], out: str, groups: Sequence[str] | None = None,
                            title: str = "") -> str:
    """A heatmap of learned merge coefficients (``LearnedMerge.coefficients``: [T] task-wise or
    [T, G] per coefficient group, e.g. AdaMerging layer-wise, aTLAS per block): tasks as rows,
    groups as columns, each cell annotated when the grid is small. Returns ``out``."""
    values = np.asarray(coefficients, np.float64)
    values = values[:, None] if values.ndim == 1 else values
    if values.ndim != 2 or values.shape[0] != len(tasks):
        raise ValueError(f"coefficients of shape {np.shape(coefficients)} do not match {len(tasks)} tasks "
                         f"(expected [T] or [T, G])")
    if groups is None:
        groups = ["all"] if values.shape[1] == 1 else [str(g) for g in range(values.shape[1])]
    groups = list(groups)
    if len(groups) != values.shape[1]:
        raise ValueError(f"{len(groups)} group names for {values.shape[1]} coefficient columns")
    fig = _figure(figsize=(1.2 + 0.55 * max(len(groups), 3), 0.9 + 0.4 * len(tasks)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(tasks)), list(tasks), fontsize=8)
    ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=45 if len(groups) > 6 else 0)
    if values.size <= 160:
        middle = (np.nanmax(values) + np.nanmin(values)) / 2
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < middle else "black")
    fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out)


def merge_coefficient_figures(results_path: str, out_dir: str) -> list[str]:
    """Heatmaps of the learned merges' coefficients in a merging-benchmark result
    (``experiments.merging.run``'s JSON), seed by seed: one PNG per ``LEARNED_MERGE_ROWS`` row that
    holds ``coefficients`` ([T] or [T, G]; ``coefficient_groups`` names the columns when present).
    Rows without coefficients are skipped; returns the paths written (none if no row has them)."""
    with open(results_path) as f:
        runs = json.load(f)
    tasks = runs.get("tasks") or runs.get("config", {}).get("tasks")
    written = []
    stem = os.path.splitext(os.path.basename(results_path))[0]
    for seed, rows in sorted(runs.get("results", {}).items()):
        for name in LEARNED_MERGE_ROWS:
            row = rows.get(name) or {}
            coefficients = row.get("coefficients")
            if coefficients is None:
                continue
            labels = tasks or [str(t) for t in range(len(coefficients))]
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            path = os.path.join(out_dir, f"{stem}_{slug}_seed{seed}.png")
            written.append(plot_merge_coefficients(coefficients, labels, path, row.get("coefficient_groups"),
                                                   title=f"{name}, seed {seed}"))
    return written


def render_docs_figures(results_dir: str = RESULTS_DIR, out_dir: str = DOCS_IMG_DIR) -> list[str]:
    """The documentation's figures from the committed results: the methods Delta-m% chart
    (``methods_delta_m.png``), the toy Pareto figure (copied from ``toy_pareto.png``) and the merge
    coefficient heatmaps the merging results hold. Returns the paths written."""
    written = []
    methods = [os.path.join(results_dir, name) for name in METHODS_RESULTS]
    methods = [p for p in methods if os.path.exists(p)]
    if methods:
        written.append(plot_methods(load_methods_results(methods), os.path.join(out_dir, "methods_delta_m.png"),
                                    title="MultiMNIST, LeNet HPS, 157 steps: Δm% per method, 3 seeds"))
    toy = os.path.join(results_dir, "toy_pareto.png")
    if os.path.exists(toy):
        os.makedirs(out_dir, exist_ok=True)
        written.append(shutil.copyfile(toy, os.path.join(out_dir, "toy_pareto.png")))
    merging = os.path.join(results_dir, "merging_vit.json")
    if os.path.exists(merging):
        written += merge_coefficient_figures(merging, out_dir)
    return written


def main(argv: Sequence[str] | None = None) -> list[str]:
    """``mtl-jax plot WORKDIR [--out FILE]`` or ``--docs [--results DIR] [--out DIR]``; prints and
    returns the paths written."""
    parser = argparse.ArgumentParser(prog="mtl-jax plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="a `mtl-jax train` workdir: plots its learning curves")
    parser.add_argument("--out", help=f"the PNG (default <workdir>/{RUN_FIGURE}); with --docs, the folder "
                                      f"(default {DOCS_IMG_DIR})")
    parser.add_argument("--docs", action="store_true", help="render the documentation's figures from the results")
    parser.add_argument("--results", default=RESULTS_DIR, help=f"with --docs: the results folder ({RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.docs == (args.workdir is not None):
        parser.error("give a WORKDIR or --docs (one of them)")
    paths = (render_docs_figures(args.results, args.out or DOCS_IMG_DIR) if args.docs
             else [plot_run(args.workdir, args.out)])
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
