"""Single-task vs all-task inference cost of the task-routed MoE ViTs (M3ViT, Mod-Squad).

Trains a config (default: Mod-Squad on MultiMNIST with one task per training pair), then for every
task measures, on the test images, XLA's FLOPs (``jit(f).lower(...).compile().cost_analysis()``)
and the wall time of

* the all-task forward (every task's pathway and head),
* the single-task forward (that task's router, pathway and head; ``tasks=(task,)``),
* the extracted sub-model (``extract_task_model``: only the experts the task routes to with usage
  share > threshold, on the test images or, with ``--calibration_examples``, on training images),
  with its test accuracy and whether its predictions equal the single-task forward's.

  python -m experiments.moe_inference_flops --config=configs/multimnist_mod_squad.py \\
      --config.num_steps=600 --config.data.num_train=8192 --config.data.num_test=1000

Writes ``experiments/results/moe_inference_flops_<model>.{json,md}``.
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
from mtl_jax.data.sources import read_all
from mtl_jax.models.flops import abstract_variables, cost_flops, inference_flops, param_count
from mtl_jax.models.moe_vit import expert_usage, extract_task_model, kept_experts
from mtl_jax.train.trainer import train_and_evaluate

def flops_and_seconds(fn, params, x, repeats: int) -> tuple[float, float]:
    """(XLA FLOPs of one call, median wall seconds over ``repeats`` calls after a warm-up)."""
    jitted = jax.jit(fn)
    flops = cost_flops(jitted.lower(params, x).compile().cost_analysis())
    jax.block_until_ready(jitted(params, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(params, x))
        times.append(time.perf_counter() - start)
    return flops, float(np.median(times))


def architecture_flops(model, input_shape, batch: int) -> dict:
    """XLA's FLOPs per example of the all-task and of each single-task forward, on abstract params
    and inputs (nothing is trained or allocated: the dense-einsum MoE's FLOPs do not depend on the
    weights or the routing)."""
    example = jax.ShapeDtypeStruct(tuple(input_shape), jax.numpy.float32)
    variables = abstract_variables(model, jax.ShapeDtypeStruct((1,) + example.shape, example.dtype))
    return {"all_tasks": inference_flops(model, variables, example, batch),
            "params": param_count(variables),
            "single_task": {t: inference_flops(model, variables, example, batch, tasks=(t,)) for t in model.heads}}


def measure(model, params, images, labels: dict, thresholds, repeats: int, calibration=None) -> dict:
    """Per task: FLOPs / time / parameters of the all-task, single-task and extracted forwards, on
    ``images``. The extracted sub-model keeps the experts the task's router uses on ``calibration``
    (other images, e.g. training ones; default: ``images`` themselves, which makes the sub-model equal
    the single-task forward on them by construction at threshold 0)."""
    x = jax.device_put(images)
    chooser = x if calibration is None else jax.device_put(calibration)
    all_tasks = lambda p, v: model.apply({"params": p}, v)
    all_flops, all_time = flops_and_seconds(all_tasks, params, x, repeats)
    all_preds = jax.jit(all_tasks)(params, x)
    out = {"batch": int(images.shape[0]), "calibration": 0 if calibration is None else int(len(calibration)),
           "all_tasks": {
        "flops": all_flops, "seconds": all_time, "params": param_count({"params": params}),
        "accuracy": {t: float((np.asarray(all_preds[t]).argmax(-1) == labels[t]).mean()) for t in model.heads}},
        "tasks": {}}
    for task in model.heads:
        single = lambda p, v, m=model, t=task: m.apply({"params": p}, v, tasks=(t,))[t]
        flops, seconds = flops_and_seconds(single, params, x, repeats)
        reference = np.asarray(jax.jit(single)(params, x))
        usage = expert_usage(model, {"params": params}, chooser, task)
        accuracy = float((reference.argmax(-1) == labels[task]).mean())
        row = {"single_task": {"flops": flops, "seconds": seconds, "accuracy": accuracy},
               "usage": {b: u.tolist() for b, u in usage.items()}, "extracted": {}}
        for threshold in thresholds:
            kept = kept_experts(usage, threshold, model.top_k)
            sub_model, sub_params = extract_task_model(model, params, task, kept)
            sub = lambda p, v, m=sub_model, t=task: m.apply({"params": p}, v)[t]
            sub_flops, sub_seconds = flops_and_seconds(sub, sub_params, x, repeats)
            pred = np.asarray(jax.jit(sub)(sub_params, x))
            row["extracted"][str(threshold)] = {
                "flops": sub_flops, "seconds": sub_seconds, "params": param_count({"params": sub_params}),
                "experts_kept": {b: len(v) for b, v in kept.items()},
                "equal_to_single_task": bool(np.array_equal(pred, reference)),
                "accuracy": float((pred.argmax(-1) == labels[task]).mean())}
        out["tasks"][task] = row
    return out


def markdown(name: str, setting: str, results: dict, test: dict) -> str:
    a = results["all_tasks"]
    lines = [f"### {name}: single-task vs all-task inference ({setting})", "",
             f"Batch of {results['batch']} test images (every accuracy in the table is on this batch; on the whole "
             "test split the all-task model scores " + ", ".join(f"{t} {100 * test[t]['accuracy']:.2f}%" for t in test)
             + "); FLOPs from XLA's cost analysis of the jitted forward, time = median wall time on this shared "
             "2-core CPU (noisy). Extracted sub-models keep the experts each task's router used on "
             + (f"{results['calibration']} training images (not the batch compared here)." if results.get("calibration")
                else "this same batch (so at threshold 0 they equal the single-task forward on it by construction)."),
             "",
             "| forward | task | FLOPs / example | vs all-task | ms / batch | params | test accuracy | = single-task |",
             "|---|---|---|---|---|---|---|---|",
             f"| all tasks | all | {a['flops'] / results['batch']:.3g} | 100% | {1e3 * a['seconds']:.1f} | "
             f"{a['params']:,} | " + ", ".join(f"{t} {100 * v:.2f}%" for t, v in a["accuracy"].items()) + " | |"]
    for task, row in results["tasks"].items():
        s = row["single_task"]
        lines.append(f"| single task | {task} | {s['flops'] / results['batch']:.3g} | "
                     f"{100 * s['flops'] / a['flops']:.1f}% | {1e3 * s['seconds']:.1f} | {a['params']:,} (all held) | {100 * s['accuracy']:.2f}% | |")
        for threshold, e in row["extracted"].items():
            kept = ", ".join(str(v) for v in e["experts_kept"].values())
            lines.append(f"| extracted (usage > {threshold}; experts per MoE block {kept}) | {task} | "
                         f"{e['flops'] / results['batch']:.3g} | {100 * e['flops'] / a['flops']:.1f}% | "
                         f"{1e3 * e['seconds']:.1f} | {e['params']:,} | {100 * e['accuracy']:.2f}% | "
                         f"{'yes' if e['equal_to_single_task'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/multimnist_mod_squad.py")
    parser.add_argument("--thresholds", default="0.0,0.02")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eval_examples", type=int, default=500)
    parser.add_argument("--calibration_examples", type=int, default=0,
                        help="choose each task's kept experts from its routing on this many training images "
                             "(0: on the evaluated test batch itself)")
    parser.add_argument("--tag", default="", help="suffix of the result files (a sweep keeps one table per run)")
    parser.add_argument("--flops_only", default="", metavar="H,W,C",
                        help="skip training: count the FLOPs of the config's architecture on inputs of this shape "
                             "with --num_tasks classification tasks (abstract params, nothing allocated)")
    parser.add_argument("--num_tasks", type=int, default=5, help="tasks of the --flops_only count")
    parser.add_argument("--time_batch", type=int, default=0,
                        help="--flops_only: also time the forwards on a batch of this many random inputs "
                             "(random weights; median of --repeats)")
    args, rest = parser.parse_known_args(argv)
    overrides = common.config_overrides(parser, rest)
    config = load_config(args.config, overrides)
    if args.flops_only:
        return flops_only(config, args, rest)
    config.progress_bar = False
    config.checkpoint.enabled = False
    config.baselines = ""
    with tempfile.TemporaryDirectory() as workdir:
        out = train_and_evaluate(config, workdir)
    state = jax.device_get(out["state"])
    from mtl_jax.data import get_dataset
    from mtl_jax.models import build_model

    dataset = get_dataset(config.data)
    model = build_model(config.model, dataset.tasks)
    test = read_all(dataset.splits["test"])
    n = args.eval_examples
    labels = {t.name: np.asarray(test[t.label_key][:n]) for t in dataset.tasks}
    calibration = None
    if args.calibration_examples:
        train = read_all(dataset.splits["train"])
        calibration = np.asarray(train[dataset.input_key][:args.calibration_examples])
    results = measure(model, state.params, np.asarray(test[dataset.input_key][:n]), labels,
                      [float(t) for t in args.thresholds.split(",")], args.repeats, calibration)
    a = config.model.arch_kwargs
    setting = (f"{config.data.name}, {out['steps']} steps of batch {config.batch_size}; ViT patch {a.patch_size}, dim "
               f"{a.dim}, depth {a.depth}, {a.num_experts} experts top-{a.top_k} per MoE block, moe_every "
               f"{a.moe_every}, {len(dataset.tasks)} tasks, load balancing {a.get('load_balance_weight', 0)}, "
               f"task-expert MI loss {a.get('mi_weight', 0)}")
    name = config.model.name + (f"_{args.tag}" if args.tag else "")
    record = {"config": args.config, "overrides": rest, "setting": setting, "test": out["results"], **results}
    common.write_json(os.path.join(common.RESULTS, f"moe_inference_flops_{name}.json"), record, indent=2)
    command = ([f"--config={args.config}", f"--thresholds={args.thresholds}", f"--repeats={args.repeats}",
                f"--eval_examples={args.eval_examples}"]
               + ([f"--calibration_examples={args.calibration_examples}"] if args.calibration_examples else [])
               + ([f"--tag={args.tag}"] if args.tag else []) + rest)  # every setting, defaults included
    table = markdown(name, setting, results, out["results"]) + "\n" + common.produced_by(__spec__.name, command) + "\n"
    common.write_text(os.path.join(common.RESULTS, f"moe_inference_flops_{name}.md"), table)
    print(table)


def flops_only(config, args, rest) -> dict:
    """``--flops_only``: the single-task / all-task FLOPs ratio of the configured architecture at any
    scale (e.g. M3ViT's own: ViT-S/16 on 512x512 images, 5 tasks), written to
    ``moe_inference_flops_<model>_<tag>.{json,md}``; ``rest``: the ``--config.*`` arguments as given."""
    from mtl_jax import tasks as T
    from mtl_jax.models import build_model

    shape = tuple(int(v) for v in args.flops_only.split(","))
    tasks = [T.classification(f"task_{k}", 10) for k in range(args.num_tasks)]
    model = build_model(config.model, tasks)
    counts = architecture_flops(model, shape, batch=2)
    if args.time_batch:
        x = jax.random.uniform(jax.random.key(1), (args.time_batch,) + shape)
        params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
        counts["seconds"] = {"all_tasks": flops_and_seconds(
            lambda p, v: model.apply({"params": p}, v), params, x, args.repeats)[1]}
        task = next(iter(model.heads))
        counts["seconds"][task] = flops_and_seconds(
            lambda p, v: model.apply({"params": p}, v, tasks=(task,))[task], params, x, args.repeats)[1]
    a = config.model.arch_kwargs
    name = config.model.name + "_flops" + (f"_{args.tag}" if args.tag else "")
    command = ([f"--config={args.config}", f"--flops_only={args.flops_only}", f"--num_tasks={args.num_tasks}"]
               + ([f"--time_batch={args.time_batch}", f"--repeats={args.repeats}"] if args.time_batch else [])
               + ([f"--tag={args.tag}"] if args.tag else []) + rest)
    seconds = counts.get("seconds", {})
    ms = lambda key: f"{1e3 * seconds[key]:.1f}" if key in seconds else ""
    lines = [f"### {config.model.name}: single-task vs all-task inference FLOPs, architecture only", "",
             f"Inputs {'x'.join(map(str, shape))}, {args.num_tasks} tasks (linear 10-way heads); ViT patch "
             f"{a.patch_size}, dim {a.dim}, depth {a.depth}, {a.num_heads} heads, dense MLP width {a.mlp_dim}, expert "
             f"width {a.get('expert_mlp_dim', 0) or a.mlp_dim}, {a.num_experts} experts top-{a.top_k} (capacity factor "
             f"{a.capacity_factor}) per MoE block, moe_every {a.moe_every}, "
             + (f"routing groups of {a.group_size} tokens" if a.get("group_size", 0) else "one routing group per example")
             + f"; {counts['params']:,} parameters. FLOPs per example: XLA's cost analysis of the compiled "
             "forward on abstract params (no training; the dense-einsum MoE's FLOPs do not depend on the weights).", "",
             "| forward | GFLOPs / example | vs all-task | ms / batch |", "|---|---|---|---|",
             f"| all {args.num_tasks} tasks | {counts['all_tasks'] / 1e9:.3f} | 100% | {ms('all_tasks')} |"]
    for task, f in counts["single_task"].items():
        lines.append(f"| single task ({task}) | {f / 1e9:.3f} | {100 * f / counts['all_tasks']:.1f}% | {ms(task)} |")
    if args.time_batch:
        lines += ["", f"ms / batch: median wall time of {args.repeats} calls on a batch of {args.time_batch} random "
                      "inputs (random weights), this shared 2-core CPU."]
    table = "\n".join(lines) + "\n\n" + common.produced_by(__spec__.name, command) + "\n"
    common.write_json(os.path.join(common.RESULTS, f"moe_inference_flops_{name}.json"),
                      {"config": args.config, "overrides": rest, "input_shape": shape, **counts}, indent=2)
    common.write_text(os.path.join(common.RESULTS, f"moe_inference_flops_{name}.md"), table)
    print(table)
    return counts


if __name__ == "__main__":
    common.run_main(main)
