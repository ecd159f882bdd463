"""Side-by-side table of several ViT merging benchmark runs (their ``.json`` outputs).

``python -m experiments.merging.compare --runs LABEL=experiments/results/merging_vit.json,...
--out experiments/results/merging_vit_ablations.md``: one row per method, one column per run, each
cell the mean test accuracy over the 8 tasks (mean ± std over the run's seeds), then each run's
mean off-diagonal task-vector cosine. Rows missing from a run are left blank.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from experiments import common


def method_names(runs: list[dict]) -> list[str]:
    """Every non-private row of every run, in first-appearance order."""
    names: list[str] = []
    for run in runs:
        for rows in run["results"].values():
            names += [n for n in rows if not n.startswith("_") and n not in names]
    return names


def cell(run: dict, name: str) -> str:
    means = [np.mean(rows[name]["acc"]) for rows in run["results"].values() if name in rows]
    return common.mean_std(means, scale=100, digits=1) if means else ""


def mean_cosine(run: dict) -> str:
    values = []
    for rows in run["results"].values():
        if "_task_vectors" in rows:
            cos = np.array(rows["_task_vectors"]["cosine"])
            values.append(cos[~np.eye(len(cos), dtype=bool)].mean())
    return f"{np.mean(values):.3f}" if values else ""


def comparison_table(labels: list[str], runs: list[dict]) -> str:
    seeds = [str(len(r["results"])) for r in runs]
    lines = ["| method | " + " | ".join(f"{label} ({n} seed{'s' if n != '1' else ''})" for label, n in zip(labels, seeds)) + " |",
             "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r, name) for r in runs) + " |" for name in method_names(runs)]
    lines.append("| task-vector cosine (mean off-diagonal) | " + " | ".join(mean_cosine(r) for r in runs) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = common.argv_or_sys(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated LABEL=path.json")
    parser.add_argument("--out", default="", help="also write the table (markdown) here")
    parser.add_argument("--title", default="ViT merging benchmark: runs side by side (mean test accuracy, %)")
    args = parser.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.runs.split(",") if item]
    bad = [p[0] for p in pairs if len(p) != 2]
    if bad:
        parser.error(f"--runs entries must be LABEL=path.json; got {bad}")
    missing = [p[1] for p in pairs if not os.path.isfile(p[1])]
    if missing:
        parser.error(f"--runs: no such file {missing}")
    labels, runs = [p[0] for p in pairs], [common.read_json(p[1]) for p in pairs]
    text = f"# {args.title}\n\n" + comparison_table(labels, runs) + "\n\n" + common.produced_by(__spec__.name, argv) + "\n"
    if args.out:
        common.write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    common.run_main(main)
