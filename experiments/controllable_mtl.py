"""Controllable multi-task network on MultiMNIST: accuracy vs XLA FLOPs for compute budgets and
task preferences (Aich et al., ICCV 2023; ``mtl_jax.models.slimmable``, ``mtl_jax.train.slimmable``).

1. Trains one slimmable network (configs/multimnist_slimmable.py) with CIKD: every step the full
   width, the smallest width and ``--num_random`` random width configurations, the sub-widths
   distilled towards the full-width encoder features (``--kd_weight``; 0 = the same sandwich
   training without CIKD, run with ``--ablation`` too).
2. Counts every width configuration's inference FLOPs with XLA's cost analysis and scores every
   configuration on a validation split held out of the training pairs.
3. For each budget (a fraction of the full model's FLOPs) and preference vector, the search picks a
   configuration (within the budget, the more preferred decoder strictly wider when that fits, best
   preference-weighted validation accuracy); reports its FLOPs and test accuracy. Also the uniform
   widths (encoder = decoders = w) as the accuracy-vs-FLOPs reference.
4. Preference control: per budget, each task's test accuracy when it is preferred (0.8) minus when
   it is not (0.2), for the strict order and for the weak one (equal widths allowed), both searched
   on the same trained network.

Writes experiments/results/controllable_mtl.md and .json. Run it under ``nice -n 10``::

    nice -n 10 python -m experiments.controllable_mtl [--steps 1500] [--ablation]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from mtl_jax.config import load_config
from mtl_jax.data import from_arrays, get_dataset
from mtl_jax.data.pipeline import train_iterator
from mtl_jax.data.sources import read_all
from mtl_jax.models import build_model
from mtl_jax.models.slimmable import width_config
from mtl_jax.train.slimmable import CIKDTrainer, make_config_evaluator, search_widths, width_config_flops

BUDGETS = (0.2, 0.35, 0.5, 0.75, 1.0)  # fractions of the full-width FLOPs
PREFERENCES = ({"left": 0.5, "right": 0.5}, {"left": 0.8, "right": 0.2}, {"left": 0.2, "right": 0.8})


def split_validation(dataset, num_val: int, seed: int):
    """The dataset with ``num_val`` training pairs moved to a 'val' split (a fixed random subset)."""
    train = read_all(dataset.splits["train"])
    order = np.random.default_rng(seed).permutation(len(train[dataset.input_key]))
    splits = {"train": {k: v[order[num_val:]] for k, v in train.items()},
              "val": {k: v[order[:num_val]] for k, v in train.items()},
              "test": read_all(dataset.splits["test"])}
    return from_arrays(dataset.name, splits, dataset.tasks, dataset.input_key)


def train_cikd(model, dataset, steps: int, batch_size: int, lr: float, kd_weight: float, num_random: int, seed: int):
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    trainer = CIKDTrainer(model, dataset.tasks, optimizer, dataset.input_key, kd_weight, num_random, seed)
    keys = [dataset.input_key] + [t.label_key for t in dataset.tasks]
    batches = train_iterator(dataset.splits["train"], keys=keys, global_batch_size=batch_size, seed=seed)
    state = trainer.init(jax.random.key(seed), jnp.asarray(dataset.splits["train"][0][dataset.input_key])[None])
    for step in range(steps):
        state, metrics = trainer.step(state, next(batches))
        if (step + 1) % max(1, steps // 5) == 0:
            full = float(metrics["losses"][model.full_width()].sum())
            small = float(metrics["losses"][model.smallest()].sum())
            print(f"  step {step + 1}: full-width loss {full:.3f}, smallest {small:.3f}, "
                  f"CIKD {float(metrics['cikd'][model.smallest()]):.4f}", flush=True)
    return state.params, trainer


def mean_accuracy(result, tasks, prefs=None) -> float:
    weights = prefs or {t.name: 1.0 for t in tasks}
    total = sum(weights.values())
    return sum(weights[t.name] * result[t.name]["accuracy"] for t in tasks) / total


def run(args) -> dict:
    config = load_config(os.path.join(common.CONFIGS, "multimnist_slimmable.py"))
    config.data.num_train, config.data.num_test = args.num_train, args.num_test
    config.model.arch_kwargs.decoder_hidden = tuple(int(h) for h in args.decoder_hidden.split(","))
    dataset = split_validation(get_dataset(config.data), args.num_val, args.seed)
    model = build_model(config.model, dataset.tasks)
    names = dataset.task_names
    example = jax.ShapeDtypeStruct(dataset.splits["train"][0][dataset.input_key].shape,
                                   dataset.splits["train"][0][dataset.input_key].dtype)
    out = {"args": vars(args), "runs": {}}
    for kd_weight in ([args.kd_weight, 0.0] if args.ablation else [args.kd_weight]):
        tick = time.process_time()
        print(f"training, kd_weight={kd_weight}", flush=True)
        params, trainer = train_cikd(model, dataset, args.steps, args.batch_size, args.lr, kd_weight,
                                     args.num_random, args.seed)
        train_cpu = time.process_time() - tick
        evaluate = make_config_evaluator(model, dataset.tasks, dataset.input_key)
        configs = model.configurations()
        flops = {c: width_config_flops(model, params, example, c) for c in configs}
        val = {c: {t: r["accuracy"] for t, r in evaluate(params, dataset, "val", c).items()} for c in configs}
        full_flops = flops[model.full_width()]
        narrow_decoders = width_config(max(model.widths), min(model.widths), names)
        test_cache = {}

        def test(c):
            if c not in test_cache:
                test_cache[c] = evaluate(params, dataset, "test", c)
            return test_cache[c]

        def searched(strict: bool) -> list[dict]:
            rows = []
            for frac in BUDGETS:
                for prefs in PREFERENCES:
                    c = search_widths(frac * full_flops, prefs, flops, val, strict=strict)
                    res = test(c)
                    rows.append({"budget": frac, "prefs": prefs, "config": str(c), "encoder": c.encoder,
                                 "decoders": dict(c.decoders), "flops": flops[c],
                                 "flops_frac": flops[c] / full_flops, "test": {t: res[t]["accuracy"] for t in names},
                                 "test_pref_weighted": mean_accuracy(res, dataset.tasks, prefs)})
            return rows

        rows, rows_weak = searched(strict=True), searched(strict=False)
        uniform = []
        for w in sorted(model.widths):
            c = width_config(w, w, names)
            res = test(c)
            uniform.append({"width": w, "flops": flops[c], "flops_frac": flops[c] / full_flops,
                            "test": {t: res[t]["accuracy"] for t in names}})
        out["runs"][str(kd_weight)] = {
            "kd_weight": kd_weight, "train_cpu_s": train_cpu, "full_flops": full_flops,
            "min_flops": min(flops.values()), "decoder_share": 1 - flops[narrow_decoders] / full_flops,
            "traced_configs": len(trainer.trace_counts),
            "max_traces_per_config": max(trainer.trace_counts.values()), "search": rows, "search_weak": rows_weak,
            "control": preference_control(rows, names), "control_weak": preference_control(rows_weak, names),
            "uniform": uniform}
        print(f"  done: {train_cpu:.0f} s CPU training; {len(trainer.trace_counts)} configurations traced, "
              f"at most {max(trainer.trace_counts.values())} time(s) each", flush=True)
    return out


def preference_control(rows: list[dict], names) -> dict:
    """{budget: {task: test accuracy when the task is preferred (0.8) minus when it is not (0.2)}}."""
    control = {}
    for frac in BUDGETS:
        acc = {(r["prefs"][names[0]], t): r["test"][t] for r in rows if r["budget"] == frac for t in names}
        control[str(frac)] = {t: acc[(0.8 if t == names[0] else 0.2, t)] - acc[(0.2 if t == names[0] else 0.8, t)]
                              for t in names}
    return control


def command_args(a: dict) -> list[str]:
    """The command-line arguments that reproduce a run with settings ``a`` (``vars(args)``)."""
    args = [f"--{k}={a[k]}" for k in ("steps", "batch_size", "num_train", "num_test", "num_val", "num_random",
                                      "kd_weight")]
    return args + (["--ablation"] if a["ablation"] else []) + (
        [f"--decoder_hidden={a['decoder_hidden']}"] if a["decoder_hidden"] != "128" else [])


def markdown(out) -> str:
    a = {"decoder_hidden": "128", **out["args"]}
    lines = ["# Controllable MTL on MultiMNIST (Aich et al., ICCV 2023)", "",
             f"One slimmable network (configs/multimnist_slimmable.py: conv 20/40 encoder, digit decoders with "
             f"hidden layers of {a['decoder_hidden']} units, widths 0.25/0.5/0.75/1.0 = 64 configurations), trained once on "
             f"{a['num_train'] - a['num_val']} MultiMNIST pairs for {a['steps']} steps of batch {a['batch_size']} "
             f"(Adam {a['lr']}, cosine). FLOPs: XLA cost analysis of the inference forward, per example. "
             f"Search: budget = fraction of the full width's FLOPs; among configurations within it whose decoder "
             f"widths follow the preference order (the more preferred decoder strictly wider when such a "
             f"configuration fits: the paper's rule), the best preference-weighted accuracy on {a['num_val']} "
             f"held-out training pairs. Accuracies: test split ({a['num_test']} pairs), one seed.", ""]
    for key, run_ in out["runs"].items():
        lines += [f"## kd_weight = {run_['kd_weight']} ({'CIKD' if run_['kd_weight'] else 'no CIKD'})", "",
                  f"Full width {run_['full_flops'] / 1e6:.3f} MFLOPs, smallest configuration "
                  f"{run_['min_flops'] / 1e6:.3f} MFLOPs; narrowing every decoder (full encoder) saves "
                  f"{100 * run_.get('decoder_share', float('nan')):.0f}% of the full width's FLOPs; training {run_['train_cpu_s']:.0f} s CPU; "
                  f"{run_['traced_configs']} width configurations traced, each "
                  f"{run_['max_traces_per_config']} time(s).", "",
                  "| budget | preference (left, right) | chosen widths | MFLOPs (% of full) | left acc | right acc | "
                  "pref.-weighted acc |", "|---|---|---|---|---|---|---|"]
        for r in run_["search"]:
            lines.append(f"| {r['budget']:.2f} | {r['prefs']['left']:.1f}, {r['prefs']['right']:.1f} | {r['config']} | "
                         f"{r['flops'] / 1e6:.3f} ({100 * r['flops_frac']:.0f}%) | {100 * r['test']['left']:.2f} | "
                         f"{100 * r['test']['right']:.2f} | {100 * r['test_pref_weighted']:.2f} |")
        if "control" in run_:
            lines += ["", "Preference control: a task's test accuracy (points) when preferred (0.8) minus when not "
                      "(0.2); strict order (above) vs weak order (equal widths allowed, same network):", "",
                      "| budget | left, strict | right, strict | left, weak | right, weak |", "|---|---|---|---|---|"]
            for frac in BUDGETS:
                strict, weak = run_["control"][str(frac)], run_["control_weak"][str(frac)]
                lines.append(f"| {frac:.2f} | {100 * strict['left']:+.2f} | {100 * strict['right']:+.2f} | "
                             f"{100 * weak['left']:+.2f} | {100 * weak['right']:+.2f} |")
        lines += ["", "Uniform widths (encoder = decoders = w):", "", "| w | MFLOPs (% of full) | left acc | right acc |",
                  "|---|---|---|---|"]
        for r in run_["uniform"]:
            lines.append(f"| {r['width']:g} | {r['flops'] / 1e6:.3f} ({100 * r['flops_frac']:.0f}%) | "
                         f"{100 * r['test']['left']:.2f} | {100 * r['test']['right']:.2f} |")
        lines.append("")
    lines.append(common.produced_by(__spec__.name, command_args(a)))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kd_weight", type=float, default=1.0)
    parser.add_argument("--num_random", type=int, default=1)
    parser.add_argument("--num_train", type=int, default=60_000)
    parser.add_argument("--num_test", type=int, default=10_000)
    parser.add_argument("--num_val", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decoder_hidden", default="128",
                        help="comma-separated hidden layer sizes of each task decoder (the config's: 128)")
    parser.add_argument("--ablation", action="store_true", help="also train with kd_weight=0")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "controllable_mtl"))
    args = parser.parse_args(argv)
    out = run(args)
    common.write_json(args.out + ".json", out, indent=1)
    text = markdown(out)
    common.write_text(args.out + ".md", text)
    print(text)


if __name__ == "__main__":
    common.run_main(main)
