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


def _finite_non_zero(value) -> bool:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and value != 0


def check_baselines(baselines: Mapping, tasks: Sequence, what: str = "baselines") -> None:
    """ValueError (one line, naming ``what`` and the entries) unless ``baselines`` holds every
    ``task.delta_m_metrics`` entry as a finite, non-zero number (Delta-m% divides by each)."""
    missing = [f"{t.name}/{m}" for t in tasks for m in t.delta_m_metrics if m not in baselines.get(t.name, {})]
    if missing:
        raise ValueError(f"Delta-m%: {what} lack {missing}")
    unusable = [f"{t.name}/{m} = {baselines[t.name][m]!r}" for t in tasks for m in t.delta_m_metrics
                if not _finite_non_zero(baselines[t.name][m])]
    if unusable:
        raise ValueError(f"Delta-m%: {what} {unusable} are not finite non-zero numbers; a change relative to "
                         f"them is undefined")


def delta_m_terms(results: Mapping, baselines: Mapping, tasks: Sequence) -> dict:
    """``{(task, metric): (-1)^h (M - M_b) / M_b}`` over each task's ``delta_m_metrics`` (h = 1 when
    higher is better): the relative loss of each metric against the baseline. ValueError naming the
    entries when a result or baseline is missing, or a baseline is 0 or not finite."""
    missing = [f"{t.name}/{m}" for t in tasks for m in t.delta_m_metrics if m not in results.get(t.name, {})]
    if missing:
        raise ValueError(f"Delta-m%: results lack {missing}")
    check_baselines(baselines, tasks)
    terms = {}
    for t in tasks:
        for metric in t.delta_m_metrics:
            m, b = float(results[t.name][metric]), float(baselines[t.name][metric])
            terms[t.name, metric] = (-1.0 if t.better(metric) else 1.0) * (m - b) / b
    return terms


def delta_m(results: Mapping, baselines: Mapping, tasks: Sequence, average: str = "metrics") -> float:
    """Delta-m% (Maninis et al. 2019; Nash-MTL, FAMO), lower is better:

        Delta_m = 100 / |M| * sum_{(k, m) in M} (-1)^{h_km} (M_km - M_b,km) / M_b,km

    over M = every task's ``delta_m_metrics`` (the main metric of a classification / regression task,
    every metric of a dense task: NYUv2's nine metrics count equally, as in Nash-MTL's code), h = 1
    when higher is better. ``average='tasks'``: the mean over tasks of each task's mean over its
    metrics (LibMTL's ``count_improvement``, whose sign is the opposite: LibMTL reports -Delta_m).
    The two agree when every task counts one metric.
    """
    terms = delta_m_terms(results, baselines, tasks)
    if average == "metrics":
        return 100.0 * sum(terms.values()) / len(terms)
    if average == "tasks":
        per_task = [sum(terms[t.name, m] for m in t.delta_m_metrics) / len(t.delta_m_metrics) for t in tasks]
        return 100.0 * sum(per_task) / len(per_task)
    raise ValueError(f"delta_m: unknown average '{average}'; valid: 'metrics', 'tasks'")


def _has_baselines(baselines, tasks) -> bool:
    return all(m in baselines.get(t.name, {}) for t in tasks for m in t.delta_m_metrics)


def results_table(results: Mapping, tasks: Sequence, baselines: Mapping | None = None, title: str = "") -> str:
    """Markdown: one row per task with every metric. Without dense tasks, a last column holds the
    single-task baseline of the main metric; with dense tasks (several metrics in Delta-m%), each
    task's single-task baseline is a row of its own under the task's row."""
    if any(len(t.delta_m_metrics) > 1 for t in tasks):
        metrics = list(dict.fromkeys(m for t in tasks for m in t.metrics))
        baseline_rows, baseline_column = bool(baselines), False
    else:
        metrics = sorted({m for t in tasks for m in t.metrics})
        baseline_rows, baseline_column = False, bool(baselines)
    head = ["task"] + metrics + (["single-task (main metric)"] if baseline_column else [])
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                          "|" + "---|" * len(head)]
    for t in tasks:
        row = [t.name] + [_fmt(results[t.name].get(m), m) for m in metrics]
        if baseline_column:
            row.append(_fmt(baselines.get(t.name, {}).get(t.metrics[0]), t.metrics[0]))
        lines.append("| " + " | ".join(row) + " |")
        if baseline_rows and t.name in baselines:
            lines.append("| " + " | ".join([f"{t.name} (single-task)"] + [
                _fmt(baselines[t.name].get(m) if m in t.metrics else None, m) for m in metrics]) + " |")
    if baselines and _has_baselines(baselines, tasks):
        lines += ["", f"Delta-m% vs single-task: {delta_m(results, baselines, tasks):+.2f} (lower is better)"]
    return "\n".join(lines)


def _fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"
