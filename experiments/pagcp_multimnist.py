"""PAGCP channel pruning of the MultiMNIST HPS LeNet: accuracy vs FLOPs, against uniform L1 pruning.

    nice -n 5 python -m experiments.pagcp_multimnist                   # 3 seeds, ~10 min on 2 CPU cores
    python -m experiments.pagcp_multimnist --steps 30 --finetune_steps 10 --num_train 512 --seeds 0 --out /tmp/p

Per seed: the HPS LeNet of ``configs/multimnist.py`` (width 2, MLP heads) is trained on MultiMNIST
pairs; PAGCP (``mtl_jax.models.pruning``, Ye et al. 2023) searches per-layer pruning ratios on
calibration pairs made from the training digits (never the test digits), measuring each task's
loss with the pruned filters masked; the sliced model is then fine-tuned. Baselines with the same
fine-tuning budget: the dense model, and uniform L1 pruning at the ratio whose FLOPs come closest to
PAGCP's, for each allowance setting. FLOPs are XLA's count for the inference forward (multiply-add = 2). Writes ``--out`` .md / .json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from mtl_jax.config import load_config
from mtl_jax.data.multimnist import load_mnist_sources, make_multimnist, overlay_pairs
from mtl_jax.models import build_model
from mtl_jax.models.flops import model_cost
from mtl_jax.models.pruning import (
    LENET_LAYERS, lenet_channels, lenet_keep, mask_hps_lenet, pagcp_search, slice_hps_lenet)

TASKS = ("left", "right")


def lenet_model(channels=()):
    config = load_config(os.path.join(common.CONFIGS, "multimnist.py"))
    config.model.trunk_kwargs.channels = tuple(channels)
    return build_model(config.model, [SimpleNamespace(name=t, num_outputs=10) for t in TASKS])


def task_losses(model, params, x, labels):
    out = model.apply({"params": params}, x)
    return jnp.stack([optax.softmax_cross_entropy_with_integer_labels(out[t], labels[t]).mean() for t in TASKS])


def train(model, params, data, steps: int, lr: float, batch: int, seed: int):
    """Adam with cosine decay on the sum of the task losses; batches drawn with replacement."""
    tx = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))

    @jax.jit
    def step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(lambda p: task_losses(model, p, x, labels).sum())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, rng = tx.init(params), np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(data["image"]), batch)
        params, opt_state, _ = step(params, opt_state, data["image"][idx], {t: data[t][idx] for t in TASKS})
    return params


def accuracy(model, params, data, batch: int = 1000) -> dict:
    predict = jax.jit(lambda p, x: {t: v.argmax(-1) for t, v in model.apply({"params": p}, x).items()})
    hits = {t: 0 for t in TASKS}
    for i in range(0, len(data["image"]), batch):
        preds = predict(params, data["image"][i:i + batch])
        for t in TASKS:
            hits[t] += int((np.asarray(preds[t]) == data[t][i:i + batch]).sum())
    return {t: hits[t] / len(data["image"]) for t in TASKS}


def pruned_row(params, keep, data, args, seed: int) -> dict:
    """Slice, report cost and accuracy before and after fine-tuning."""
    channels = lenet_channels(keep)
    model = lenet_model(channels)
    sliced = jax.tree_util.tree_map(jnp.asarray, slice_hps_lenet(params, keep))
    before = accuracy(model, sliced, data["test"])
    tuned = train(model, sliced, data["train"], args.finetune_steps, args.finetune_lr, args.batch_size, seed + 1)
    cost = model_cost(model, data["test"]["image"][0])
    return {"channels": channels, "acc_before_finetune": before, "acc": accuracy(model, tuned, data["test"]), **cost}


def run_seed(args, data, seed: int) -> dict:
    dense = lenet_model()
    x0 = data["train"]["image"][:1]
    params = train(dense, dense.init(jax.random.key(seed), x0)["params"], data["train"], args.steps, args.lr,
                   args.batch_size, seed)
    params = jax.device_get(params)
    cal = data["calibration"]
    losses = jax.jit(lambda p: task_losses(dense, p, cal["image"], {t: cal[t] for t in TASKS}))
    full_channels = lenet_channels(lenet_keep(params["shared"], {}))
    flops_cache = {}

    def evaluate(ratios):
        return np.asarray(losses(mask_hps_lenet(params, lenet_keep(params["shared"], ratios))))

    def flops(ratios):
        channels = lenet_channels(lenet_keep(params["shared"], ratios))
        if channels not in flops_cache:
            flops_cache[channels] = model_cost(lenet_model(channels), x0[0])["flops_per_example"]
        return flops_cache[channels]

    rows = {
        "Dense": {"channels": full_channels, "acc_before_finetune": accuracy(dense, params, data["test"]),
                  **model_cost(dense, x0[0])},
        "Dense + fine-tuning": pruned_row(params, lenet_keep(params["shared"], {}), data, args, seed),
    }
    rows["Dense"]["acc"] = rows["Dense"]["acc_before_finetune"]
    search_log = {}
    for rate, total in args.allowances:
        search = pagcp_search(LENET_LAYERS, args.ratios, evaluate, flops, initial_rate=rate, total_threshold=total,
                              topk=args.topk)
        target = flops(search.ratios)
        uniform = min(args.ratios, key=lambda r: abs(flops({layer: r for layer in LENET_LAYERS}) - target))
        name = f"PAGCP (allowance {rate:g}, total {total:g})"
        rows[name] = pruned_row(params, lenet_keep(params["shared"], search.ratios), data, args, seed)
        rows[f"{name}: uniform L1, closest FLOPs"] = {**pruned_row(
            params, lenet_keep(params["shared"], {layer: uniform for layer in LENET_LAYERS}), data, args, seed),
            "uniform_ratio": uniform}
        search_log[name] = {"ratios": search.ratios, "order": search.order, "searched": search.searched,
                            "stopped_by": {k: (None if v is None else TASKS[v]) for k, v in search.stopped_by.items()},
                            "thresholds": search.thresholds, "efficiency": search.efficiency}
        print(f"seed {seed} {name}: {json.dumps(search_log[name], default=str)}", flush=True)
    return {"rows": rows, "search": search_log}


def fmt(values) -> str:
    return common.mean_std(values, scale=100)


def report(args, results: dict, wall: float, argv) -> str:
    seeds = list(results)
    names = list(results[seeds[0]]["rows"])
    dense_flops = results[seeds[0]]["rows"]["Dense"]["flops_per_example"]
    lines = [
        "### PAGCP channel pruning of the MultiMNIST HPS LeNet", "",
        f"Seeds {tuple(seeds)}; test accuracy (%), mean ± std over seeds. {args.num_train} train / {args.num_test} test "
        f"pairs, {args.num_calibration} calibration pairs from the training digits. Dense: {args.steps} Adam steps "
        f"(lr {args.lr}, cosine, batch {args.batch_size}); pruned models and 'Dense + fine-tuning': {args.finetune_steps} "
        f"more steps (lr {args.finetune_lr}). PAGCP: ratios {tuple(args.ratios)}, topk {args.topk}; each setting's "
        f"uniform baseline takes the per-layer ratio whose FLOPs come closest to PAGCP's. FLOPs: XLA, inference of both tasks, per example. Wall "
        f"time {wall / 60:.1f} min.", "",
        "| model | channels (conv_0, conv_1, dense_0) | FLOPs | FLOPs vs dense | params | left | right | average | "
        "average before fine-tuning |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        per = [results[s]["rows"][name] for s in seeds]
        channels = sorted({tuple(r["channels"]) for r in per})
        flops = np.mean([r["flops_per_example"] for r in per])
        avg = [np.mean([r["acc"][t] for t in TASKS]) for r in per]
        before = [np.mean([r["acc_before_finetune"][t] for t in TASKS]) for r in per]
        label = name if "uniform_ratio" not in per[0] else (
            name + " (per-layer ratio " + " / ".join(f"{r['uniform_ratio']:g}" for r in per) + ")")
        lines.append(f"| {label} | {' / '.join(map(str, channels))} | {flops / 1e6:.2f}M | {flops / dense_flops:.2f}x | "
                     f"{np.mean([r['params'] for r in per]) / 1e3:.1f}k | {fmt([r['acc']['left'] for r in per])} | "
                     f"{fmt([r['acc']['right'] for r in per])} | {fmt(avg)} | {fmt(before)} |")
    lines += ["", "PAGCP search per seed (ratio kept in the sequential search, the task that stopped each layer):", ""]
    for s in seeds:
        for name, log in results[s]["search"].items():
            lines.append(f"- seed {s}, {name}: order {list(log['order'])}, searched {log['searched']}, stopped by "
                         f"{log['stopped_by']}, final {log['ratios']}")
    lines += ["", common.produced_by(__spec__.name, argv)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num_train", type=int, default=10000)
    p.add_argument("--num_test", type=int, default=2000)
    p.add_argument("--num_calibration", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--finetune_steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--finetune_lr", type=float, default=5e-4)
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--allowances", default="0.05:1.12,0.5:2.5,1:5",
                   help="PAGCP settings initial_rate:total_threshold (the first layer's relative loss allowance and "
                        "the compounded one over all layers), comma separated")
    p.add_argument("--topk", type=float, default=1.0, help="fraction of searched layers kept pruned")
    p.add_argument("--out", default="experiments/results/pagcp_multimnist")
    argv = common.argv_or_sys(argv)
    args = p.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.allowances = [tuple(float(v) for v in a.split(":")) for a in args.allowances.split(",")]
    start = time.time()
    multi = make_multimnist(args.num_train, args.num_test, seed=0)
    (train_x, train_y), _ = load_mnist_sources(seed=0)
    data = {"train": multi["train"], "test": multi["test"],
            "calibration": overlay_pairs(train_x, train_y, args.num_calibration, seed=99)}
    results = {int(s): run_seed(args, data, int(s)) for s in args.seeds.split(",")}
    common.write_json(args.out + ".json", {"args": vars(args), "results": results}, indent=1,
                      default=lambda v: np.asarray(v).tolist())
    table = report(args, results, time.time() - start, argv)
    common.write_text(args.out + ".md", table + "\n")
    print(table)


if __name__ == "__main__":
    common.run_main(main)
