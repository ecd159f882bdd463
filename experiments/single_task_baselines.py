"""Single-task baselines for Delta-m%: the same config trained once per task.

    python experiments/single_task_baselines.py --config=configs/multimnist.py [--config.key=value ...]

Writes ``experiments/results/<dataset>_single_task.json`` ({task: {metric: value}}, what a config's
``baselines`` field points at) and a markdown table beside it. Workdirs go under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mtl_jax.config import load_config  # noqa: E402
from mtl_jax.data import get_dataset  # noqa: E402
from mtl_jax.train.reporting import results_table  # noqa: E402
from mtl_jax.train.trainer import train_and_evaluate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", default="runs/single_task")
    parser.add_argument("--out", default="", help="JSON path (default: experiments/results/<dataset>_single_task.json)")
    args, rest = parser.parse_known_args(argv)
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
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
    path = args.out or os.path.join(RESULTS, f"{dataset.name}_single_task.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(baselines, f, indent=2)
    command = " ".join(["python experiments/single_task_baselines.py", f"--config={args.config}"] + rest)
    table = results_table(baselines, tasks, title=f"{dataset.name}: single-task baselines")
    with open(path.replace(".json", ".md"), "w") as f:
        f.write(f"{table}\n\nProduced by: `{command}`\n")
    print(table)


if __name__ == "__main__":
    from mtl_jax.host_memory import reuse_freed_memory

    reuse_freed_memory()  # as `mtl-jax train`: before JAX starts its CPU threads
    main()
