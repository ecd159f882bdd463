"""Train-step time of every architecture config, in one sitting (rounds interleaved across them).

    python -m benchmarks.architecture_step_time                     # every config of experiments.architectures
    python -m benchmarks.architecture_step_time --archs=hps,mmoe --steps 10 --rounds 3

Each architecture is built as ``python -m experiments.architectures`` trains it (its config, the same budget
overrides: MultiMNIST 10k pairs at batch 64, other families their own data), on one device; its jitted
``train_step`` runs ``--steps`` steps on one fixed batch per round, the rounds interleaved over the
architectures so that a change of machine load hits them alike. Prints JSON and a table of the median
ms / step and steps/s, with the ratio to HPS-LeNet (``hps``) for the MultiMNIST architectures when
it is timed. The steps/s column of ``experiments/results/architectures.md`` comes from training logs
taken at different times (loaded or idle machine); this gives comparable numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from benchmarks.step_time import first_batch, time_steps  # noqa: E402
from experiments.architectures import discover_entries, family_budget, select, warmup_cap  # noqa: E402
from mtl_jax.config import load_config  # noqa: E402
from mtl_jax.train.trainer import build_experiment  # noqa: E402


def build(entry, extra: list) -> tuple:
    """(jitted train step, initial state, one training batch) of ``entry`` at its experiment budget."""
    overrides = list(family_budget(entry.family, smoke=False, full=False)) + list(extra)
    overrides += warmup_cap(entry.config, overrides) + ["mesh.data=1", "mesh.model=1", "progress_bar=False"]
    config = load_config(entry.config, overrides)
    exp = build_experiment(config)
    return exp.train_step, exp.init(), first_batch(exp, config.batch_size), config.batch_size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="", help="comma list of architecture names ('' = all)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the results JSON here")
    args, extra = parser.parse_known_args(argv)
    extra = [o.removeprefix("--config.") for o in extra]
    entries = select(discover_entries(), args.archs)
    built, times = {}, {}
    for entry in entries:
        step, state, batch, batch_size = build(entry, extra)
        state, _ = time_steps(step, state, batch, 1)  # compile + one step
        built[entry.name] = [step, state, batch, batch_size]
        times[entry.name] = []
    for _ in range(args.rounds):
        for name, item in built.items():
            item[1], seconds = time_steps(item[0], item[1], item[2], args.steps)
            times[name].append(seconds)
    hps_ms = 1e3 * statistics.median(times["hps"]) if "hps" in times else None
    rows = []
    for entry in entries:
        ms = 1e3 * statistics.median(times[entry.name])
        x_hps = ms / hps_ms if hps_ms and entry.family == "multimnist" else None
        rows.append({"arch": entry.name, "family": entry.family, "batch_size": built[entry.name][3],
                     "ms_per_step": ms, "steps_per_sec": 1e3 / ms, "x_hps": x_hps,
                     "rounds_ms": [round(1e3 * t, 2) for t in times[entry.name]]})
    result = {"device": jax.devices()[0].platform, "cpus": os.cpu_count(), "steps": args.steps,
              "rounds": args.rounds, "loadavg_end": os.getloadavg(), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("\n| architecture | family | batch | ms / step | steps/s | x HPS-LeNet |\n|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['x_hps']:.2f}" if r["x_hps"] else "-"
        print(f"| {r['arch']} | {r['family']} | {r['batch_size']} | {r['ms_per_step']:.1f} | "
              f"{r['steps_per_sec']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
