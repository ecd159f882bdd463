"""ScaLearn two-stage transfer on the merging benchmark's 8 real-digit tasks and pretrained ViT.

    nice -n 5 python -m experiments.merging.scalearn                                    # 8 tasks, 3 seeds, ~27 min
    python -m experiments.merging.scalearn --config=configs/merge/vit_benchmark.py:smoke  # seconds

Frohmann et al., "ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to
Scale" (arXiv 2310.01217), at CPU scale: the merging benchmark's rotation-pretrained trunk
(``experiments.merging.training.pretrained_trunk``, same cache) stays frozen. Stage 1: per task, one bottleneck adapter
in every block plus its head (from the task's linear probe) is trained (the "Adapter" row, the
paper's single-task adapter baseline). Stage 2, per target task: all 8 adapters (the target's own
included, as in the paper) are frozen in every block and only omega + the target head are trained
(``mtl_jax.merging.fit_scalearn``), for each variant in ``config.scalearn.variants``; with
``leave_target_out`` also plain ScaLearn over the other 7 adapters only (pure transfer, which the
paper does not run). Rows: linear probe, full fine-tuning (the merging benchmark's "individual"
recipe), adapter, ScaLearn variants. Writes ``config.scalearn.out`` + ``.md`` / ``.json``.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments.merging.report import markdown_table
from experiments.merging.run import CONFIG
from experiments.merging.statistics import accuracy
from experiments.merging.training import (
    EvalSet,
    eval_set,
    finetune,
    head_logits,
    linear_probe,
    make_step,
    run_steps,
    sampler,
    setup,
    single_task_loss,
)
from mtl_jax.merging import fit_scalearn, init_omega, stack_source_adapters
from mtl_jax.merging.scalearn import ADAPTER_KEY
from mtl_jax.merging.tree import flatten_with_paths, replace_flat
from mtl_jax.models.adapters import adapter_hidden
from mtl_jax.models.trunks import ViT
from mtl_jax.train.losses import cross_entropy
from mtl_jax.train.optim import make_optimizer

LEAVE_OUT = "ScaLearn (target adapter left out)"


def adapter_vit(config, num_adapters: int) -> ViT:
    return ViT(**config.model, num_adapters=num_adapters,
               adapter_hidden=adapter_hidden(config.model.dim, config.scalearn.adapter_reduction))


def adapters_and_heads_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on the adapter leaves and the heads, zero updates on the frozen trunk."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if any(getattr(k, "key", None) in (ADAPTER_KEY, "heads") for k in path)
            else "frozen", params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


@functools.partial(jax.jit, static_argnums=0)
def composed_predictions(model: ViT, params, omega, head, x):
    """argmax class of x [B, 28, 28, 1] under the adapter model with scales omega -> [B]."""
    return jnp.argmax(head_logits(head, model.apply({"params": params}, x, omega=omega)), -1)


def composed_accuracy(model, params, omega, head, data: EvalSet) -> float:
    preds = np.concatenate([np.asarray(composed_predictions(model, params, omega, head, xb)) for xb in data.x])
    return float(np.mean(preds[: len(data.y)] == data.y))


def train_adapter(config, step_tx, model1, pretrained, head, task, seed: int):
    """Stage 1: the task's adapter + head on the frozen trunk, from (pretrained, probe head). The adapter's
    init draw is the seed's, the same for every task (as the fine-tuning heads' fixed key in training.finetune)."""
    x, y = task.splits["train"]
    init = model1.init(jax.random.key(seed), x[:1])["params"]
    shared = replace_flat(init, dict(flatten_with_paths(pretrained)))
    step, tx = step_tx
    params, _ = run_steps(step, tx, {"shared": shared, "heads": {"task": head}}, config.scalearn.adapter.steps,
                                sampler(x, y, config.scalearn.adapter.batch_size), seed)
    return params["shared"], params["heads"]["task"]


def transfer(config, sources, head, task, variant: str, seed: int) -> tuple[float, dict]:
    """Stage 2 for one target: omega + head over ``sources`` (stage-1 trunks); (test accuracy, info)."""
    cfg = config.scalearn
    model = adapter_vit(config, len(sources))
    stacked = stack_source_adapters(sources)
    x, y = task.splits["train"]
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    val = eval_set(*task.splits["val"], config.eval_batch)

    def loss(omega, head, key, stacked, xs, ys):
        idx = jax.random.randint(key, (cfg.batch_size,), 0, xs.shape[0])
        logits = head_logits(head, model.apply({"params": stacked}, xs[idx], omega=omega))
        return jnp.mean(cross_entropy(logits, ys[idx]))

    key_init, key_fit = jax.random.split(jax.random.key(seed))
    omega0 = init_omega(key_init, variant, config.model.depth, len(sources), config.model.dim, cfg.init_scale)
    result = fit_scalearn(loss, omega0, head, steps=cfg.steps, lr=cfg.lr, dropout=cfg.dropout,
                          validate=lambda o, h: composed_accuracy(model, stacked, o, h, val),
                          eval_every=cfg.eval_every, key=key_fit, args=(stacked, xs, ys))
    test = eval_set(*task.splits["test"], config.eval_batch)
    omega = np.asarray(result.omega)
    info = {"transfer_params": result.num_transfer_params, "loss_first": float(result.history[:10].mean()),
            "loss_last": float(result.history[-10:].mean()), "omega_mean": float(omega.mean()),
            "omega_own": float(omega[:, list(config.tasks).index(task.name)].mean()) if len(sources) == len(
                config.tasks) else None}
    return composed_accuracy(model, stacked, result.omega, result.head, test), info


def run_seed(config, trainers, trunk, pretrained, tasks, seed: int) -> dict:
    """Every row for one seed: {row: {"acc": [T] test accuracies, ...}}."""
    cfg = config.scalearn
    model1 = adapter_vit(config, 1)
    adapter_tx = adapters_and_heads_only(make_optimizer(cfg.adapter.optim, cfg.adapter.steps))
    adapter_step = (make_step(single_task_loss(model1), adapter_tx), adapter_tx)
    rows = {name: {"acc": []} for name in ("Linear probe", "Fine-tuning (full)", "Adapter")}
    sources, heads = [], []
    for task in tasks:
        test = eval_set(*task.splits["test"], config.eval_batch)
        probe = linear_probe(config, trainers, trunk, pretrained, task, seed)
        rows["Linear probe"]["acc"].append(accuracy(trunk, pretrained, probe, test))
        tuned = finetune(config, trainers, pretrained, probe, task, seed)
        rows["Fine-tuning (full)"]["acc"].append(accuracy(trunk, tuned["shared"], tuned["heads"][task.name], test))
        shared, head = train_adapter(config, adapter_step, model1, pretrained, probe, task, seed)
        rows["Adapter"]["acc"].append(composed_accuracy(model1, shared, jnp.ones((1, 1, 1)), head, test))
        sources.append(shared)
        heads.append(probe)
        common.log(f"seed {seed} {task.name}: probe {rows['Linear probe']['acc'][-1]:.3f} "
                  f"fine-tuned {rows['Fine-tuning (full)']['acc'][-1]:.3f} adapter {rows['Adapter']['acc'][-1]:.3f}")
    runs = [(v, v, None) for v in cfg.variants] + ([(LEAVE_OUT, "scalearn", "out")] if cfg.leave_target_out else [])
    for row, variant, mode in runs:
        rows[row] = {"acc": [], "info": []}
        for t, task in enumerate(tasks):
            pool = [s for i, s in enumerate(sources) if i != t] if mode == "out" else sources
            acc, info = transfer(config, pool, heads[t], task, variant, seed)
            rows[row]["acc"].append(acc)
            rows[row]["info"].append(info)
        common.log(f"seed {seed} {row}: mean {np.mean(rows[row]['acc']):.3f}")
    return rows


def write_report(config, results: dict, tasks, pretrain_log: dict, wall: float, argv) -> str:
    names = [t.name for t in tasks]
    seed0 = results[next(iter(results))]
    params = {row: seed0[row]["info"][0]["transfer_params"] for row in seed0 if "info" in seed0[row]}
    cfg = config.scalearn
    hidden = adapter_hidden(config.model.dim, cfg.adapter_reduction)
    lines = [
        "### ScaLearn transfer on 8 real-digit tasks (frozen rotation-pretrained ViT)", "",
        f"Seeds {tuple(results)}; test accuracy (%), mean ± std over seeds. Trunk: the merging benchmark's "
        f"({config.model.to_dict()}, rotation pretext loss {pretrain_log.get('loss_first', float('nan')):.2f} -> "
        f"{pretrain_log.get('loss_last', float('nan')):.2f}), frozen except in the full fine-tuning row. Adapter: "
        f"a bottleneck adapter (dim {config.model.dim} -> {hidden} -> {config.model.dim}, ReLU) after every block's MLP "
        f"+ the head from the task's linear probe, {cfg.adapter.steps} steps of batch {cfg.adapter.batch_size}, "
        f"AdamW {cfg.adapter.optim.lr} cosine. ScaLearn: all {len(names)} adapters frozen in every block, omega + the "
        f"target head (from its probe) trained {cfg.steps} steps of batch {cfg.batch_size}, AdamW {cfg.lr} linear "
        f"decay, omega dropout {cfg.dropout}, omega ~ N({cfg.init_scale} / K, 0.001), best of every {cfg.eval_every} "
        f"steps on the validation split kept. Transfer parameters (omega only): "
        + ", ".join(f"{row} {n}" for row, n in params.items())
        + f". Full fine-tuning: the merging benchmark's individual recipe ({config.finetune.steps} steps). "
        f"Wall time of this invocation: {wall / 60:.1f} min.", "",
        markdown_table(results, names, "acc"), "",
        common.produced_by(__spec__.name, argv),
    ]
    table = "\n".join(lines)
    common.write_text(cfg.out + ".md", table + "\n")
    common.write_json(cfg.out + ".json", {"tasks": names, "results": {str(s): r for s, r in results.items()},
                                          "argv": list(argv)}, indent=1, default=float)
    return table


def run(config, argv=()) -> dict:
    start = time.time()
    tasks, trunk, trainers, pretrained, pretrain_log, _ = setup(config)
    os.makedirs(os.path.dirname(os.path.abspath(config.scalearn.out)), exist_ok=True)
    results = {}
    for seed in config.seeds:
        path = os.path.join(config.scalearn.workdir, common.settings_hash(config.to_dict(), seed) + ".json")
        results[seed] = common.cached_json(path, lambda: run_seed(config, trainers, trunk, pretrained, tasks, seed))
    table = write_report(config, results, tasks, pretrain_log, time.time() - start, argv)
    return {"results": results, "tasks": [t.name for t in tasks], "table": table}


def main(argv=None):
    argv = common.argv_or_sys(argv)
    config = common.parse_config_file(argv, __doc__.splitlines()[0], CONFIG)
    print(run(config, argv)["table"])


if __name__ == "__main__":
    common.run_main(main)
