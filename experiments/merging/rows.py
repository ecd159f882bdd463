"""The rows of the ViT merging benchmark for one seed: the baselines (linear probe, individual
fine-tuned models, multi-task training), every merge method of ``mtl_jax.merging`` that applies to
T models (grid hyperparameters picked on the validation split), the per-task reconstructions (TALL
masks, EMR) and the learned-coefficient methods (AdaMerging, aTLAS, Self Positioning).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.merging.statistics import (
    Context,
    accuracy,
    from_merge_space,
    merge_statistics,
    task_vector_diagnostics,
    to_merge_space,
)
from experiments.merging.training import eval_set, finetune, head_logits, init_head, linear_probe, multitask_train
from mtl_jax import merging as M
from mtl_jax.merging import learned
from mtl_jax.train.losses import cross_entropy

BASELINES = ("Pretrained (linear probe)", "Individual (fine-tuned)", "Multi-task trained")
PER_TASK_ROWS = ("TALL-mask retrieval", "EMR")  # one reconstructed model per task, not one merged model
ADAMERGING_STEPS = 500  # the AdaMerging paper's optimisation steps (official code: epochs = 500)


class RowHooks(NamedTuple):
    """How the rows see a trunk: its merge space (``to_merge_space(trunk params) -> {"shared": ...}``,
    inverted by reshaping to the trunk's shapes) and its Fisher / RegMean statistics
    (``statistics(trunk, finetuned, heads, tasks, num_examples, seed)``, as
    :func:`~experiments.merging.statistics.merge_statistics`). Defaults: the toy ViT's."""

    to_merge_space: Callable = to_merge_space
    statistics: Callable = merge_statistics


def task_accuracies(ctx: Context, trees: Sequence, split: str) -> np.ndarray:
    """Accuracy of task t with backbone ``trees[t]`` (merge space) and head t, per task."""
    data = ctx.val if split == "val" else ctx.test
    return np.array([accuracy(ctx.trunk, from_merge_space(tree, ctx.template), head, d)
                     for tree, head, d in zip(trees, ctx.heads, data)])


def merged_accuracies(ctx: Context, tree, split: str) -> np.ndarray:
    return task_accuracies(ctx, [tree] * len(ctx.heads), split)


def val_score(ctx: Context, accs: np.ndarray) -> float:
    """Mean normalised validation accuracy (the selection criterion of the TALL-mask / LiNeS code)."""
    return float(np.mean(accs / ctx.ft_val))


def select(ctx: Context, merge: Callable, values: Sequence) -> tuple:
    """(best value, merged tree) by :func:`mtl_jax.merging.grid_search` on the validation split."""
    if len(values) == 1:
        return values[0], merge(values[0])
    result = M.grid_search(merge, list(values), lambda tree: val_score(ctx, merged_accuracies(ctx, tree, "val")))
    return result.best_value, result.best_params


def traced_merge(fn: Callable, name: str, **fixed) -> Callable:
    """``v -> fn(p0, fts, **fixed, name=v)`` jitted once with ``v`` traced, so a grid costs one compile."""
    jitted = jax.jit(lambda p0, fts, v: fn(p0, fts, **fixed, **{name: v}))
    return lambda p0, fts: (lambda v: jitted(p0, fts, jnp.float32(v)))


def scaled_merge(fn: Callable, name: str, **fixed) -> Callable:
    """For a method whose hyperparameter ``name`` only scales its merged task vector,
    ``theta_0 + v * tau(fixed)`` (task arithmetic, TIES, DARE, Consensus, TSV-M, Iso-C / CTS):
    ``(p0, fts) -> (v -> merged tree)`` computing ``tau`` once (one call of ``fn`` at ``v = 1``),
    so a grid costs one merge, not one per value (TIES's global top-k and the SVD methods' SVDs
    on a 22.7M-parameter model take minutes each on CPU)."""
    unit = jax.jit(lambda p0, fts: fn(p0, fts, **fixed, **{name: 1.0}))
    scale = jax.jit(lambda p0, one, v: jax.tree_util.tree_map(
        lambda a, b: (a.astype(jnp.float32) + v * (b.astype(jnp.float32) - a.astype(jnp.float32))).astype(a.dtype),
        p0, one))
    return lambda p0, fts: (lambda one: (lambda v: scale(p0, one, jnp.float32(v))))(unit(p0, fts))


def merge_methods(config, ctx: Context, stats: Callable[[], dict], seed: int) -> dict:
    """``{row name: merge() -> (hparams, tree)}`` for every entry of MERGE_METHODS that applies to
    T models (SLERP merges exactly two and is skipped). Grid hyperparameters are picked by
    :func:`select`; the others are the papers' defaults. ``stats()`` gives the Fisher / RegMean
    statistics (computed on first use)."""
    c = config.merge
    p0, fts = ctx.pretrained, ctx.finetuned
    dare_key = jax.random.key(1000 + seed)

    def grid(fn, name, values, **fixed):
        def run():
            merge = traced_merge(fn, name, **fixed)(p0, fts)
            return (lambda best: ({name: best[0]}, best[1]))(select(ctx, merge, values))
        return run

    def scaled_grid(fn, name, values, **fixed):
        def run():
            merge = scaled_merge(fn, name, **fixed)(p0, fts)
            return (lambda best: ({name: best[0]}, best[1]))(select(ctx, merge, values))
        return run

    def fixed(fn, hparams=None, **kwargs):
        return lambda: (hparams or {}, jax.jit(lambda a, b: fn(a, b, **kwargs))(p0, fts))

    def greedy_soup():  # Model soups' Algorithm 1 with the grids' validation score
        res = M.greedy_soup(p0, fts, lambda tree: val_score(ctx, merged_accuracies(ctx, tree, "val")))
        return {"ingredients": [config.tasks[i] for i in res.ingredients]}, res.params

    return {
        "Weight averaging": fixed(M.weight_average),
        "Greedy soup": greedy_soup,
        "Task arithmetic": scaled_grid(M.task_arithmetic, "lam", c.ta_lambdas),
        "TIES": scaled_grid(M.ties_merging, "lam", c.ties_lambdas, top_k=c.ties_top_k),
        "DARE (TA)": scaled_grid(M.dare_merging, "lam", c.dare_lambdas, key=dare_key, p=c.dare_p, combine="ta"),
        "Consensus TA": scaled_grid(M.consensus_merging, "lam", c.dare_lambdas, k=c.consensus_k, tall_lambda=c.tall_lambda),
        "LiNeS (TA)": grid(M.lines_merging, "beta", c.lines_betas, base="ta"),
        "TSV-M": scaled_grid(M.tsv_merging, "alpha", c.svd_alphas),
        "Iso-C": scaled_grid(M.iso_c_merging, "alpha", c.svd_alphas),
        "Iso-CTS": scaled_grid(M.iso_cts_merging, "alpha", c.svd_alphas),
        "Fisher": lambda: fixed(M.fisher_merging, fishers=stats()["fisher"])(),
        "RegMean": lambda: fixed(M.regmean_merging, {"alpha": c.regmean_alpha}, grams=stats()["grams"],
                                 alpha=c.regmean_alpha)(),
        "Model Stock": fixed(M.model_stock),
        "Multi-SLERP": fixed(M.multi_slerp),
    }


def tall_mask_rows(config, ctx: Context) -> tuple[dict, np.ndarray]:
    """TALL-mask retrieval (Wang et al. 2024, Sec. 4): per task, lambda_t from the grid by the task's
    own validation accuracy (:func:`mtl_jax.merging.select_tall_lambdas`); test task t with its
    reconstruction (:func:`mtl_jax.merging.tall_mask_models`)."""
    best, _ = M.select_tall_lambdas(ctx.pretrained, ctx.finetuned, lambda trees: task_accuracies(ctx, trees, "val"),
                                    list(config.merge.tall_lambdas))
    trees = jax.jit(M.tall_mask_models)(ctx.pretrained, ctx.finetuned, jnp.asarray(best, jnp.float32))
    return {"lam_t": best}, task_accuracies(ctx, trees, "test")


@jax.jit
def emr_models(pretrained, finetuned):
    """EMR-Merging (Huang et al. 2024): per-task ``theta_0 + s_t * M_t * tau_uni`` and the rescalers."""
    model = M.emr_merging(pretrained, finetuned)
    return [M.emr_retrieve(pretrained, model, t) for t in range(len(finetuned))], model.rescalers


def emr_rows(ctx: Context) -> tuple[dict, np.ndarray]:
    """EMR rows (tuning-free)."""
    trees, scales = emr_models(ctx.pretrained, ctx.finetuned)
    return {"s_t": [round(float(s), 3) for s in scales]}, task_accuracies(ctx, trees, "test")


def learned_methods(config, ctx: Context, tasks, seed: int, ta_lambda: Callable[[], float]) -> dict:
    """AdaMerging (task-wise, layer-wise, layer-wise++; Yang et al. ICLR 2024) minimising the summed
    mean prediction entropy (their Eq. 4) on unlabelled test batches of ``batch_per_task`` images
    per task drawn from a pool of the first ``pool_per_task`` test images of every task (fewer if a
    task has fewer); aTLAS (Zhang et al. NeurIPS 2024)
    minimising the cross-entropy on the last ``atlas_examples_per_task`` labelled validation
    examples per task (disjoint from the first ``val_per_task`` used by ``validate``, which keeps
    the best coefficients by mean normalised validation accuracy). The "init = TA lambda" row starts
    layer-wise AdaMerging from ``ta_lambda()`` (task arithmetic's validated lambda) instead of the
    paper's 0.3, which was TA's optimum for 8 CLIP tasks and is not here; the "lr x 500 / steps" row
    scales Adam's lr so the coefficients can move as far as in the paper's 500 steps."""
    c = config.learned
    trunk, template, heads = ctx.trunk, ctx.template, ctx.heads
    num = len(heads)
    size = min([c.pool_per_task] + [len(t.splits["test"][1]) for t in tasks])  # equal pools: digits has 359
    pool = jnp.stack([jnp.asarray(t.splits["test"][0][:size]) for t in tasks])  # [T, P, ...]
    n_lab = c.atlas_examples_per_task
    for t in tasks:
        if len(t.splits["val"][1]) < n_lab + config.merge.val_per_task:
            raise ValueError(f"task {t.name}: {len(t.splits['val'][1])} validation examples cannot hold "
                             f"{config.merge.val_per_task} for selection + {n_lab} for aTLAS")
    lab_x = jnp.stack([jnp.asarray(t.splits["val"][0][-n_lab:]) for t in tasks])
    lab_y = jnp.stack([jnp.asarray(t.splits["val"][1][-n_lab:]) for t in tasks])

    def task_logits(merged, x):  # x [T, B, ...] -> list of [B, C_t]
        b = x.shape[1]
        h = trunk.apply({"params": from_merge_space(merged, template)}, x.reshape((num * b,) + x.shape[2:]))
        h = h.reshape(num, b, -1)
        return [head_logits(heads[t], h[t]) for t in range(num)]

    def entropy_objective(merged, key):
        idx = jax.random.randint(key, (num, c.batch_per_task), 0, pool.shape[1])
        x = jax.vmap(lambda xs, i: xs[i])(pool, idx)
        return sum(jnp.mean(learned.prediction_entropy(z)) for z in task_logits(merged, x))

    def atlas_objective(merged, key):
        return sum(jnp.mean(cross_entropy(z, lab_y[t])) for t, z in enumerate(task_logits(merged, lab_x)))

    def validate(merged):
        return val_score(ctx, merged_accuracies(ctx, merged, "val"))

    ada = dict(init=c.init, lr=c.lr, steps=c.steps)

    def adamerging(init=None, **kw):
        def merge():
            start = ada["init"] if init is None else init()
            hparams = kw if init is None else {**kw, "init": start}
            return hparams, learned.adamerging(ctx.pretrained, ctx.finetuned, entropy_objective,
                                               key=jax.random.key(seed), **{**ada, "init": start, **kw}).params
        return merge

    def atlas(lr):
        return lambda: ({"lr": lr}, learned.atlas(ctx.pretrained, ctx.finetuned, atlas_objective, lr=lr,
                                                  weight_decay=c.atlas_weight_decay, steps=c.atlas_steps,
                                                  validate=validate, eval_every=c.atlas_eval_every,
                                                  key=jax.random.key(seed)).params)

    return {
        "AdaMerging (task-wise)": adamerging(granularity="task"),
        "AdaMerging (layer-wise)": adamerging(granularity="layer"),
        "AdaMerging++ (layer-wise)": adamerging(granularity="layer", plus_plus=True, top_k=c.top_k),
        "AdaMerging (layer-wise, init = TA lambda)": adamerging(init=ta_lambda, granularity="layer"),
        # The paper's 500 Adam steps at lr 1e-3 let a coefficient travel up to 0.5; with fewer steps the same travel
        # needs lr * 500 / steps.
        "AdaMerging (layer-wise, lr x 500 / steps)": adamerging(granularity="layer", lr=c.lr * ADAMERGING_STEPS / c.steps),
        "aTLAS": atlas(c.atlas_lr),
        # aTLAS's coefficients start at 0 (official code: torch.zeros); its task-addition runs take 20 epochs over the
        # validation sets (hundreds of steps), so with few steps at lr 1e-3 they barely leave the pretrained model.
        "aTLAS (lr x 500 / steps)": atlas(c.atlas_lr * ADAMERGING_STEPS / c.atlas_steps),
        "Self Positioning": lambda: ({}, learned.self_positioning(ctx.pretrained, ctx.finetuned, atlas_objective,
                                                                  lr=c.sp_lr, steps=c.sp_steps,
                                                                  key=jax.random.key(seed)).params),
    }


def run_seed(config, trainers, trunk, pretrained_shared, tasks, seed: int, cache_dir: str,
             hooks: RowHooks = RowHooks()) -> dict:
    """Every row of the table for one seed: ``{row: {"acc": [T] test accuracies, "hparams", "seconds"}}``.
    Rows are cached as JSON next to the seed's checkpoints (keyed by the merging settings), written
    after every row, and the file accumulates: a later (or interrupted and restarted) run computes
    only the wanted rows it lacks (a new method, a ``methods`` subset)."""
    key = common.settings_hash(config.probe.to_dict(), config.finetune.to_dict(), seed)
    folder = os.path.join(cache_dir, f"seed{seed}-{key}" + ("-frozen-heads" if config.freeze_heads else ""))
    results_path = os.path.join(folder, "results-" + common.settings_hash(
        config.multitask.to_dict(), config.merge.to_dict(), config.learned.to_dict(), config.eval_batch,
        True) + ".json")  # True: a constant in the key, so the file names of stored results stay valid
    done = {k: v for k, v in common.read_json(results_path, {}).items() if not k.startswith("_")}
    results = seed_rows(config, trainers, trunk, pretrained_shared, tasks, seed, folder, done, hooks,
                        save=lambda rows: common.write_json(results_path, {**done, **rows}, default=float))
    common.write_json(results_path, {**done, **results}, default=float)
    return results


def baseline_models(config, trainers, trunk, pretrained_shared, tasks, seed: int, folder: str, timings: dict):
    """(linear probes, fine-tuned models, multi-task model) of one seed, each trained once and cached
    under ``folder``; ``timings`` gets each stage's seconds."""
    names = [t.name for t in tasks]
    t0 = time.time()
    probes = [common.cached_tree(os.path.join(folder, f"probe_{t.name}.npz"),
                                 init_head(jax.random.key(0), trunk.dim, t.num_classes),
                                 lambda t=t, i=i: linear_probe(config, trainers, trunk, pretrained_shared, t,
                                                               100 * seed + i))
              for i, t in enumerate(tasks)]
    timings["probe"] = time.time() - t0
    t0 = time.time()
    finetuned = [common.cached_tree(os.path.join(folder, f"finetuned_{t.name}.npz"),
                                    {"shared": pretrained_shared, "heads": {t.name: probes[i]}},
                                    lambda t=t, i=i: finetune(config, trainers, pretrained_shared, probes[i], t,
                                                              100 * seed + i))
                 for i, t in enumerate(tasks)]
    timings["finetune"] = time.time() - t0
    t0 = time.time()
    mtl = common.cached_tree(
        os.path.join(folder, f"multitask-{common.settings_hash(config.multitask.to_dict())}.npz"),
        {"shared": pretrained_shared, "heads": dict(zip(names, probes))},
        lambda: multitask_train(config, trainers, pretrained_shared, dict(zip(names, probes)), tasks, seed))
    timings["multitask"] = time.time() - t0
    return probes, finetuned, mtl


def row_json(hparams: dict, acc: np.ndarray, individual: np.ndarray, seconds: float) -> dict:
    """One row as stored: test accuracies, accuracies normalised by the individual models', hyperparameters."""
    return {"acc": acc.tolist(), "normalised": (acc / individual).tolist(), "hparams": hparams,
            "seconds": round(seconds, 2)}


def seed_rows(config, trainers, trunk, pretrained_shared, tasks, seed: int, folder: str, done: dict,
              hooks: RowHooks = RowHooks(), save: Optional[Callable[[dict], None]] = None) -> dict:
    """The rows of :func:`run_seed` (checkpoints cached under ``folder``); method rows already in
    ``done`` (the JSON form) are reused, the baselines are always re-evaluated. ``hooks``: the
    trunk's merge space and statistics; ``save(rows so far)`` runs after every computed row."""
    rows, timings = {}, {}
    val = [eval_set(t.splits["val"][0][: config.merge.val_per_task], t.splits["val"][1][: config.merge.val_per_task],
                    config.eval_batch) for t in tasks]
    test = [eval_set(*t.splits["test"], config.eval_batch) for t in tasks]
    probes, finetuned, mtl = baseline_models(config, trainers, trunk, pretrained_shared, tasks, seed, folder, timings)
    heads = [ft["heads"][t.name] for ft, t in zip(finetuned, tasks)]
    rows["Pretrained (linear probe)"] = ({}, np.array([accuracy(trunk, pretrained_shared, h, d)
                                                       for h, d in zip(probes, test)]))
    rows["Individual (fine-tuned)"] = ({}, np.array([accuracy(trunk, ft["shared"], h, d)
                                                     for ft, h, d in zip(finetuned, heads, test)]))
    rows["Multi-task trained"] = ({}, np.array([accuracy(trunk, mtl["shared"], mtl["heads"][t.name], d)
                                                for t, d in zip(tasks, test)]))
    for name in BASELINES:
        common.log(f"seed {seed} {name}: test accuracy {np.round(rows[name][1], 4).tolist()} (timings {timings})")

    ctx = Context(trunk, pretrained_shared, hooks.to_merge_space(pretrained_shared),
                  [hooks.to_merge_space(ft["shared"]) for ft in finetuned], heads, val, test,
                  np.array([accuracy(trunk, ft["shared"], h, d) for ft, h, d in zip(finetuned, heads, val)]))

    @functools.cache
    def statistics():
        t0 = time.time()
        out = hooks.statistics(trunk, finetuned, heads, tasks, config.merge.stats_examples, seed)
        timings["statistics"] = time.time() - t0
        return out

    @functools.cache
    def ta_lambda() -> float:  # task arithmetic's validated lambda (its row's, or selected afresh)
        if "Task arithmetic" in rows:
            hparams = rows["Task arithmetic"][0]
        elif "Task arithmetic" in done:
            hparams = done["Task arithmetic"]["hparams"]
        else:
            hparams = methods["Task arithmetic"]()[0]
        return float(hparams["lam"])

    methods = {**merge_methods(config, ctx, statistics, seed), **learned_methods(config, ctx, tasks, seed, ta_lambda),
               "TALL-mask retrieval": lambda: tall_mask_rows(config, ctx), "EMR": lambda: emr_rows(ctx)}
    wanted = set(config.methods) if config.methods else set(methods)
    unknown = wanted - set(methods)
    if unknown:
        raise ValueError(f"unknown method rows {sorted(unknown)}; valid: {list(methods)}")
    for name, merge in methods.items():
        if name not in wanted or name in done:
            continue
        t0 = time.time()
        hparams, out = merge()
        rows[name] = (hparams, out if name in PER_TASK_ROWS else merged_accuracies(ctx, out, "test"))
        timings[name] = time.time() - t0
        common.log(f"seed {seed} {name}: mean test accuracy {rows[name][1].mean():.4f} ({timings[name]:.1f} s)")
        if save is not None:
            save({n: row_json(hp, acc, rows["Individual (fine-tuned)"][1], timings.get(n, 0.0))
                  for n, (hp, acc) in rows.items() if n not in BASELINES})
    computed = {name: row_json(hp, acc, np.array(rows["Individual (fine-tuned)"][1]), timings.get(name, 0.0))
                for name, (hp, acc) in rows.items()}
    reused = {name: done[name] for name in methods if name in wanted and name in done}
    return computed | reused | {"_timings": {k: round(v, 2) for k, v in timings.items()},
                                "_task_vectors": task_vector_diagnostics(ctx, ta_lambda())}
