"""MT-DeepONet vs single-task DeepONets on the Fisher-KPP and Darcy data (``mtl_jax.data.pde``).

    nice -n 10 python -m experiments.deeponet_pde [--problems=fisher,darcy] [--seeds=0,1] [--steps=3000]

Same budget per task: every model trains ``--steps`` steps at the config's batch size; a
multi-task record holds one instance of every task, so per step the MT model and each
single-task model see the same ``batch_size`` instances of a task; widths, optimiser and
schedule are the config's. Writes ``experiments/results/deeponet_pde.{json,md}`` (test relative
L2 error per task, mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from experiments import common
from mtl_jax.config import load_config
from mtl_jax.data.pde import DARCY_GEOMETRIES, FISHER_FAMILIES
from mtl_jax.train.trainer import train_and_evaluate

CONFIGS = {"fisher": "configs/pde_fisher.py", "darcy": "configs/pde_darcy.py"}
TASKS = {"fisher": tuple(FISHER_FAMILIES), "darcy": tuple(DARCY_GEOMETRIES)}


def run(config_path: str, task: str, seed: int, steps: int, workdir: str) -> dict:
    """{'rel_l2': {task: value}, 'params': count, 'seconds': wall} of one training run."""
    spec = os.path.join(common.ROOT, config_path) + (f":task={task}" if task else "")
    config = load_config(spec, [f"num_steps={steps}", f"seed={seed}", f"data.seed={seed}",
                                "checkpoint.enabled=False", "progress_bar=False"])
    start = time.perf_counter()
    out = train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    params = sum(x.size for x in jax.tree.leaves(out["state"].params))
    return {"rel_l2": {t: r["relative_l2"] for t, r in out["results"].items()}, "params": int(params),
            "seconds": seconds}


def main(argv=None):
    argv = common.argv_or_sys(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="fisher,darcy")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for problem in args.problems.split(","):
            path = CONFIGS[problem]
            tasks = TASKS[problem]
            entry = {"mt": [], "st": {}}
            for seed in seeds:
                mt = run(path, "", seed, args.steps, os.path.join(tmp, f"{problem}_mt_{seed}"))
                entry["mt"].append(mt)
                for task in tasks:
                    st = run(path, task, seed, args.steps, os.path.join(tmp, f"{problem}_{task}_{seed}"))
                    entry["st"].setdefault(task, []).append(st)
                print(problem, seed, mt["rel_l2"], {t: v[-1]["rel_l2"][t] for t, v in entry["st"].items()}, flush=True)
            entry["tasks"] = tasks
            results[problem] = entry
    common.write_json(os.path.join(common.RESULTS, "deeponet_pde.json"),
                      {"steps": args.steps, "seeds": seeds, "results": results}, indent=2)
    lines = ["# MT-DeepONet vs single-task DeepONets: test relative L2 error (%)", "",
             f"{args.steps} steps per model, seeds {seeds} (mean ± std), lower is better.", ""]
    for problem, entry in results.items():
        mt_params = entry["mt"][0]["params"]
        st_params = sum(entry["st"][t][0]["params"] for t in entry["tasks"])
        lines += [f"## {problem} ({CONFIGS[problem]})", "",
                  f"Parameters: MT-DeepONet {mt_params:,}; single-task DeepONets {st_params:,} in all. "
                  f"Wall time per seed: MT {np.mean([r['seconds'] for r in entry['mt']]):.0f} s, single-task "
                  f"{sum(np.mean([r['seconds'] for r in entry['st'][t]]) for t in entry['tasks']):.0f} s in all.", "",
                  "| task | MT-DeepONet | single-task DeepONet |", "|---|---|---|"]
        for t in entry["tasks"]:
            mt, st = ([r["rel_l2"][t] for r in runs] for runs in (entry["mt"], entry["st"][t]))
            lines.append(f"| {t} | {common.mean_std(mt, scale=100, ddof=1)} | {common.mean_std(st, scale=100, ddof=1)} |")
        lines.append("")
    lines.append(common.produced_by(__spec__.name, argv, common.load_average_note() + "; wall times are on a shared machine"))
    common.write_text(os.path.join(common.RESULTS, "deeponet_pde.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
