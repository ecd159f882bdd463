"""Single-task baselines for Delta-m%: the same config trained once per task.

    python -m experiments.single_task_baselines --config=configs/multimnist.py [--config.key=value ...]

Writes ``experiments/results/<dataset>_single_task.json`` ({task: {metric: value}}, what a config's
``baselines`` field points at) and a markdown table beside it. Workdirs go under ``--workdir``.
"""

from __future__ import annotations

import argparse
import os

from experiments import common
from mtl_jax.config import load_config
from mtl_jax.data import get_dataset
from mtl_jax.train.reporting import results_table
from mtl_jax.train.trainer import train_and_evaluate


def main(argv=None):
    argv = common.argv_or_sys(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", default="runs/single_task")
    parser.add_argument("--out", default="", help="JSON path (default: experiments/results/<dataset>_single_task.json)")
    args, rest = parser.parse_known_args(argv)
    overrides = common.config_overrides(parser, rest)
    config = load_config(args.config, overrides)
    dataset = get_dataset(config.data)
    baselines, tasks = {}, []
    for task in dataset.tasks:
        single = load_config(args.config, overrides)
        single.data.tasks = (task.name,)
        single.baselines = ""
        out = train_and_evaluate(single, os.path.join(args.workdir, f"{dataset.name}_{task.name}"))
        baselines[task.name] = out["results"][task.name]
        tasks.append(task)
    path = args.out or os.path.join(common.RESULTS, f"{dataset.name}_single_task.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    common.write_json(path, baselines, indent=2)
    table = results_table(baselines, tasks, title=f"{dataset.name}: single-task baselines")
    common.write_text(path.replace(".json", ".md"), f"{table}\n\n{common.produced_by(__spec__.name, argv)}\n")
    print(table)


if __name__ == "__main__":
    common.run_main(main)
