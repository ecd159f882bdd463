"""Metric writers (JSONL + TensorBoard) and the results table (per task, Delta-m%)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import jax


class MetricWriter:
    """Appends ``{"step", "split", name: value}`` lines to ``metrics.jsonl`` (a NaN / Inf value as
    null) and TensorBoard scalars (tensorboardX, no TensorFlow) under ``tensorboard/``. Only process 0
    writes."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **{
            k: v if math.isfinite(v) else None for k, v in values.items()}}, allow_nan=False) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()


def flatten_metrics(per_task: Mapping[str, Mapping[str, float]]) -> dict:
    return {f"{task}/{metric}": value for task, metrics in per_task.items() for metric, value in metrics.items()}


def delta_m(results: Mapping, baselines: Mapping, tasks: Sequence) -> float:
    """Delta-m% (Maninis et al. 2019, as in LibMTL / Nash-MTL):

        Delta_m = 100/K * sum_k (-1)^{h_k} (M_k - M_{b,k}) / M_{b,k}

    over each task's main metric (its first), h_k = 1 when higher is better. Lower is better.
    """
    total = 0.0
    for t in tasks:
        metric = t.metrics[0]
        m, b = float(results[t.name][metric]), float(baselines[t.name][metric])
        sign = -1.0 if t.higher_is_better[0] else 1.0
        total += sign * (m - b) / b
    return 100.0 * total / len(tasks)


def results_table(results: Mapping, tasks: Sequence, baselines: Mapping | None = None, title: str = "") -> str:
    """Markdown: one row per task (every metric, the single-task baseline of the main metric)."""
    metrics = sorted({m for t in tasks for m in t.metrics})
    head = ["task"] + metrics + (["single-task (main metric)"] if baselines else [])
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                          "|" + "---|" * len(head)]
    for t in tasks:
        row = [t.name] + [_fmt(results[t.name].get(m), m) for m in metrics]
        if baselines:
            row.append(_fmt(baselines.get(t.name, {}).get(t.metrics[0]), t.metrics[0]))
        lines.append("| " + " | ".join(row) + " |")
    if baselines and all(t.name in baselines and t.metrics[0] in baselines[t.name] for t in tasks):
        lines += ["", f"Delta-m% vs single-task: {delta_m(results, baselines, tasks):+.2f} (lower is better)"]
    return "\n".join(lines)


def _fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"
