"""Real-data ViT merging benchmark: pretrain, probe, fine-tune per task, train multi-task, merge.

    nice -n 10 python experiments/merging/run.py                                   # 8 tasks, 3 seeds
    python experiments/merging/run.py --config=configs/merge/vit_benchmark.py:smoke  # seconds
    python experiments/merging/run.py --config.seeds='(0,)' --config.finetune.steps=100

The analogue, at CPU scale, of the ViT-B/32 8-task tables of task arithmetic / TIES / AdaMerging /
TALL masks: a small ViT (``mtl_jax.models.trunks.ViT``, blocks ``block_{i}``) is pretrained by
rotation prediction (Gidaris et al. 2018) on the union of the unlabelled train images, so it never
sees a task label; every task gets a linear probe on the frozen trunk (the "pretrained" row, in
place of CLIP's zero-shot head), then backbone + head are fine-tuned from there (LP-FT, Kumar et al.
2022) into one model per task. Merging acts on the backbone only; each task keeps its fine-tuned
head. Stages are cached as .npz under ``config.workdir`` (keyed by a hash of the settings they
depend on), so re-running only re-merges. Writes ``config.out`` + ``.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import resource
import sys
import time
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)

from experiments.merging import tasks as task_lib  # noqa: E402
from mtl_jax import merging as M  # noqa: E402
from mtl_jax.config import apply_overrides, config_from_file  # noqa: E402
from mtl_jax.merging import learned  # noqa: E402
from mtl_jax.merging.tree import flatten_with_paths, leaf_paths, map_with_path, replace_flat  # noqa: E402
from mtl_jax.models.heads import LinearHead  # noqa: E402
from mtl_jax.models.trunks import ViT  # noqa: E402
from mtl_jax.train.losses import cross_entropy  # noqa: E402
from mtl_jax.train.optim import make_optimizer  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "merge", "vit_benchmark.py")

# ----------------------------------------------------------------------------------------- model


@functools.partial(jax.jit, static_argnums=0)
def features(trunk: nn.Module, shared, x):
    """Trunk representation [B, dim] of images x [B, 28, 28, 1]."""
    return trunk.apply({"params": shared}, x)


def head_logits(head, h):
    """A task's linear head (``LinearHead`` params ``{"out": {kernel [D, C], bias [C]}}``) on h [B, D]."""
    return LinearHead(head["out"]["bias"].shape[-1]).apply({"params": head}, h)


@functools.partial(jax.jit, static_argnums=(1, 2))
def init_head(key, dim: int, num_classes: int):
    return LinearHead(num_classes).init(key, jnp.zeros((1, dim)))["params"]


@functools.partial(jax.jit, static_argnums=0)
def predictions(trunk: nn.Module, shared, head, x):
    """argmax class of every image of one batch x [B, 28, 28, 1] -> [B]."""
    return jnp.argmax(head_logits(head, trunk.apply({"params": shared}, x)), -1)


class EvalSet(NamedTuple):
    """Images padded to whole batches of one fixed size (one compile for every split), on device,
    [NB, B, 28, 28, 1]; labels (numpy, unpadded)."""

    x: jax.Array
    y: np.ndarray


def eval_set(x: np.ndarray, y: np.ndarray, batch: int) -> EvalSet:
    pad = -len(x) % batch
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    return EvalSet(jnp.asarray(xp.reshape((-1, batch) + x.shape[1:])), y)


def predict_all(trunk, shared, head, data: EvalSet) -> np.ndarray:
    """Predicted class of every (unpadded) example of ``data`` -> [N]."""
    return np.concatenate([np.asarray(predictions(trunk, shared, head, xb)) for xb in data.x])[: len(data.y)]


def accuracy(trunk, shared, head, data: EvalSet) -> float:
    return float(np.mean(predict_all(trunk, shared, head, data) == data.y))


# ------------------------------------------------------------------------------------- training


def make_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
    """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)`` for ``loss_fn(params, batch)``."""

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def run_steps(step: Callable, tx, params, steps: int, batch_fn: Callable, seed: int):
    """``steps`` optimiser steps on host-sampled batches ``batch_fn(np_rng)``; returns (params, losses [steps])."""
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch_fn(rng))
        losses.append(loss)
    return params, np.asarray(jax.device_get(losses), np.float64)


def sampler(x: np.ndarray, y: np.ndarray, batch: int) -> Callable:
    """``rng -> (x[idx], y[idx])`` with ``batch`` indices drawn uniformly with replacement."""
    return lambda rng: (lambda idx: (x[idx], y[idx]))(rng.integers(0, len(x), batch))


class Trainers(NamedTuple):
    """The jitted steps of every stage, built once per run (jit caches by shape across tasks/seeds)."""

    single: tuple  # (step, tx): backbone + one head on (x [B, ...], y [B])
    multitask: tuple  # (step, tx): backbone + all heads on (x [T, B, ...], y [T, B])
    probe: tuple  # (step, tx): one head on frozen features (h [N, D], y [N])


def single_task_loss(trunk):
    def loss(params, batch):
        x, y = batch
        (head,) = params["heads"].values()
        return jnp.mean(cross_entropy(head_logits(head, trunk.apply({"params": params["shared"]}, x)), y))

    return loss


def multitask_loss(trunk, names: Sequence[str]):
    """Sum over tasks of the mean cross-entropy; one trunk pass over all T * B images. The heads have
    different class counts, so they are applied one by one to their task's slice."""

    def loss(params, batch):
        x, y = batch
        num, b = y.shape
        h = trunk.apply({"params": params["shared"]}, x.reshape((num * b,) + x.shape[2:])).reshape(num, b, -1)
        return sum(jnp.mean(cross_entropy(head_logits(params["heads"][t], h[i]), y[i])) for i, t in enumerate(names))

    return loss


def probe_loss(head, batch):
    h, y = batch
    return jnp.mean(cross_entropy(head_logits(head, h), y))


def frozen_heads(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` on ``params["shared"]``, zero updates on ``params["heads"]`` (the heads stay at their
    linear probes, as the papers keep CLIP's zero-shot text heads fixed while fine-tuning)."""
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda params: {"shared": "train", "heads": "frozen"})


def build_trainers(config, trunk) -> Trainers:
    def pair(loss, optim, steps, freeze=False):
        tx = make_optimizer(optim, steps)
        tx = frozen_heads(tx) if freeze else tx
        return make_step(loss, tx), tx

    return Trainers(
        single=pair(single_task_loss(trunk), config.finetune.optim, config.finetune.steps, config.freeze_heads),
        multitask=pair(multitask_loss(trunk, config.tasks), config.multitask.optim, config.multitask.steps,
                       config.freeze_heads),
        probe=pair(probe_loss, config.probe.optim, config.probe.steps),
    )


def pretrain(config, trunk, sources) -> tuple[dict, dict]:
    """Rotation-prediction pretraining of the trunk (no task labels). Returns (shared params, log)."""
    cfg = config.pretrain
    images = task_lib.pretext_images(sources, cfg.seed, cfg.max_images)
    x, y = task_lib.rotation_pretext(images, cfg.seed)
    key_trunk, key_head = jax.random.split(jax.random.key(cfg.seed))
    params = {"shared": jax.jit(trunk.init)(key_trunk, x[:1])["params"],
              "heads": {"rotation": init_head(key_head, trunk.dim, 4)}}
    tx = make_optimizer(cfg.optim, cfg.steps)
    params, losses = run_steps(make_step(single_task_loss(trunk), tx), tx, params, cfg.steps,
                               sampler(x, y, cfg.batch_size), cfg.seed)
    return params["shared"], {"pretext_images": len(images), "loss_first": losses[:10].mean(),
                              "loss_last": losses[-10:].mean()}


def linear_probe(config, trainers, trunk, shared, task, seed: int):
    """Linear head on frozen pretrained features of the task's train split (full-batch Adam)."""
    x, y = task.splits["train"]
    h = np.concatenate([np.asarray(features(trunk, shared, xb)) for xb in eval_set(x, y, config.eval_batch).x])[: len(y)]
    head = init_head(jax.random.key(seed), trunk.dim, task.num_classes)
    step, tx = trainers.probe
    head, _ = run_steps(step, tx, head, config.probe.steps, lambda rng: (h, y), seed)
    return head


def finetune(config, trainers, shared, head, task, seed: int):
    """Backbone + head fine-tuned on one task, from (pretrained backbone, linear-probe head)."""
    step, tx = trainers.single
    x, y = task.splits["train"]
    # Trained under a fixed head key so every task with the same class count reuses one compile.
    params, _ = run_steps(step, tx, {"shared": shared, "heads": {"task": head}}, config.finetune.steps,
                          sampler(x, y, config.finetune.batch_size), seed)
    return {"shared": params["shared"], "heads": {task.name: params["heads"]["task"]}}


def multitask_train(config, trainers, shared, heads: dict, tasks, seed: int):
    """Joint training of backbone + all heads from (pretrained, probes): every step a batch of
    ``batch_size`` from each task, loss = sum of the task losses."""
    samplers = [sampler(*t.splits["train"], config.multitask.batch_size) for t in tasks]

    def batch_fn(rng):
        xs, ys = zip(*(s(rng) for s in samplers))
        return np.stack(xs), np.stack(ys)

    step, tx = trainers.multitask
    params, _ = run_steps(step, tx, {"shared": shared, "heads": dict(heads)}, config.multitask.steps, batch_fn, seed)
    return params


# ----------------------------------------------------------------------------------------- cache


def settings_hash(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def save_tree(path: str, tree) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{p: np.asarray(x) for p, x in flatten_with_paths(tree)})
    os.replace(tmp, path)


def load_tree(path: str, template):
    """A tree shaped like ``template`` with the leaves stored in ``path`` (ValueError on a mismatch)."""
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
    missing = [p for p in leaf_paths(template) if p not in flat]
    if missing:
        raise ValueError(f"{path} lacks leaves {missing[:5]}")
    return replace_flat(template, {k: jnp.asarray(v) for k, v in flat.items()})


def cached(path: str, template, build: Callable):
    """``build()`` once, stored at ``path``; later calls load it (into ``template``'s structure)."""
    if os.path.exists(path):
        return load_tree(path, template)
    tree = build()
    save_tree(path, tree)
    return tree


# ----------------------------------------------------------------------------------- merge space

ATTENTION_IN = ("query", "key", "value")


def _attention_leaf(path: str) -> tuple[str, str] | None:
    parts = path.split("/")
    if len(parts) >= 3 and parts[-3] == "attention":
        return parts[-2], parts[-1]
    return None


def to_merge_space(shared):
    """``{"shared": trunk}`` with attention DenseGeneral params flattened to the 2-D / 1-D layout of
    a fused linear layer (as CLIP's ``in_proj`` / ``out_proj``): q/k/v kernels (D, H, Dh) ->
    (D, H*Dh), biases (H, Dh) -> (H*Dh,); out kernel (H, Dh, D) -> (H*Dh, D). Elementwise methods
    are unaffected; the SVD methods (TSV-M, Iso-C/CTS) and RegMean see these as matrices."""

    def leaf(path, x):
        att = _attention_leaf(path)
        if att is None:
            return x
        name, kind = att
        if kind == "bias" or name not in ATTENTION_IN:
            return x.reshape(-1) if kind == "bias" else x.reshape(-1, x.shape[-1])
        return x.reshape(x.shape[0], -1)

    return map_with_path(leaf, {"shared": shared})


def from_merge_space(tree, template):
    """Inverse of :func:`to_merge_space`: trunk params shaped like ``template`` (the trunk tree)."""
    return jax.tree_util.tree_map(lambda x, t: x.reshape(t.shape), tree["shared"], template)


# ------------------------------------------------------------------------------------ statistics


@functools.partial(jax.jit, static_argnums=0)
def fisher_diagonal(trunk, shared, head, x, key):
    """Diagonal Fisher of the backbone (Matena & Raffel 2022, Sec. 2): mean over examples of the
    squared gradient of ``log p(y_hat | x)`` with ``y_hat ~ p(. | x)`` sampled from the model (one
    sample per example, an unbiased estimate of the expectation over labels). x [N, ...]."""
    logits = head_logits(head, trunk.apply({"params": shared}, x))
    labels = jax.random.categorical(key, logits)

    def log_lik(params, xi, yi):
        return jax.nn.log_softmax(head_logits(head, trunk.apply({"params": params}, xi[None])))[0, yi]

    grads = jax.vmap(jax.grad(log_lik), in_axes=(None, 0, 0))(shared, x, labels)
    return jax.tree_util.tree_map(lambda g: jnp.mean(g * g, axis=0), grads)


@functools.partial(jax.jit, static_argnums=0)
def regmean_grams(trunk, shared, x):
    """RegMean Gram matrices ``G = X^T X`` of the inputs of every Dense / DenseGeneral layer of the
    trunk (Jin et al. 2023, Sec. 3.2), summed over examples and tokens, keyed by the merge-space
    kernel path ``shared/<module path>/kernel``; a DenseGeneral over k axes has its last k input
    axes flattened (attention ``out``: (H, Dh) -> H*Dh). The patch-embedding Conv has none (averaged)."""
    grams = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
            num_axes = len(module.axis) if isinstance(module, nn.DenseGeneral) and isinstance(module.axis, tuple) else 1
            inputs = args[0]
            flat = inputs.reshape(-1, int(np.prod(inputs.shape[inputs.ndim - num_axes:])))
            grams["/".join(("shared",) + tuple(module.path) + ("kernel",))] = flat.T @ flat
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        trunk.apply({"params": shared}, x)
    return grams


# ------------------------------------------------------------------------------------- benchmark


class Context(NamedTuple):
    """Everything the merging stage of one seed needs."""

    trunk: nn.Module
    template: dict  # trunk params (shapes for from_merge_space)
    pretrained: dict  # merge space
    finetuned: list  # merge space, one per task
    heads: list  # fine-tuned heads, one per task
    val: list  # EvalSet per task
    test: list
    ft_val: np.ndarray  # individual fine-tuned validation accuracy per task (normaliser)


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


def merge_methods(config, ctx: Context, stats: Callable[[], dict], seed: int) -> dict:
    """``{row name: merge() -> (hparams, tree)}`` for every entry of MERGE_METHODS that applies to
    T models (SLERP merges exactly two and is skipped). Grid hyperparameters are picked by
    :func:`select`; the others are the papers' defaults. ``stats()`` gives the Fisher / RegMean
    statistics (computed on first use)."""
    c = config.merge
    p0, fts = ctx.pretrained, ctx.finetuned
    dare_key = jax.random.key(1000 + seed)

    def grid(fn, name, values, **fixed):
        merge = traced_merge(fn, name, **fixed)(p0, fts)
        return lambda: (lambda best: ({name: best[0]}, best[1]))(select(ctx, merge, values))

    def fixed(fn, hparams=None, **kwargs):
        return lambda: (hparams or {}, jax.jit(lambda a, b: fn(a, b, **kwargs))(p0, fts))

    def greedy_soup():  # Model soups' Algorithm 1 with the grids' validation score
        res = M.greedy_soup(p0, fts, lambda tree: val_score(ctx, merged_accuracies(ctx, tree, "val")))
        return {"ingredients": [config.tasks[i] for i in res.ingredients]}, res.params

    return {
        "Weight averaging": fixed(M.weight_average),
        "Greedy soup": greedy_soup,
        "Task arithmetic": grid(M.task_arithmetic, "lam", c.ta_lambdas),
        "TIES": grid(M.ties_merging, "lam", c.ties_lambdas, top_k=c.ties_top_k),
        "DARE (TA)": grid(M.dare_merging, "lam", c.dare_lambdas, key=dare_key, p=c.dare_p, combine="ta"),
        "Consensus TA": grid(M.consensus_merging, "lam", c.dare_lambdas, k=c.consensus_k, tall_lambda=c.tall_lambda),
        "LiNeS (TA)": grid(M.lines_merging, "beta", c.lines_betas, base="ta"),
        "TSV-M": grid(M.tsv_merging, "alpha", c.svd_alphas),
        "Iso-C": grid(M.iso_c_merging, "alpha", c.svd_alphas),
        "Iso-CTS": grid(M.iso_cts_merging, "alpha", c.svd_alphas),
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
    paper's 0.3, which was TA's optimum for 8 CLIP tasks and is not here."""
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
                                               key=jax.random.key(seed), **{**ada, "init": start}, **kw).params
        return merge

    return {
        "AdaMerging (task-wise)": adamerging(granularity="task"),
        "AdaMerging (layer-wise)": adamerging(granularity="layer"),
        "AdaMerging++ (layer-wise)": adamerging(granularity="layer", plus_plus=True, top_k=c.top_k),
        "AdaMerging (layer-wise, init = TA lambda)": adamerging(init=ta_lambda, granularity="layer"),
        "aTLAS": lambda: ({}, learned.atlas(ctx.pretrained, ctx.finetuned, atlas_objective, lr=c.atlas_lr,
                                            weight_decay=c.atlas_weight_decay, steps=c.atlas_steps,
                                            validate=validate, eval_every=c.atlas_eval_every,
                                            key=jax.random.key(seed)).params),
        "Self Positioning": lambda: ({}, learned.self_positioning(ctx.pretrained, ctx.finetuned, atlas_objective,
                                                                  lr=c.sp_lr, steps=c.sp_steps,
                                                                  key=jax.random.key(seed)).params),
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_seed(config, trainers, trunk, pretrained_shared, tasks, seed: int, cache_dir: str) -> dict:
    """Every row of the table for one seed: ``{row: {"acc": [T] test accuracies, "hparams", "seconds"}}``.
    Rows are cached as JSON next to the seed's checkpoints (keyed by the merging settings) and the file
    accumulates: a later run computes only the wanted rows it lacks (a new method, a ``methods`` subset)."""
    key = settings_hash(config.probe.to_dict(), config.finetune.to_dict(), seed)
    folder = os.path.join(cache_dir, f"seed{seed}-{key}" + ("-frozen-heads" if config.freeze_heads else ""))
    results_path = os.path.join(folder, "results-" + settings_hash(
        config.multitask.to_dict(), config.merge.to_dict(), config.learned.to_dict(), config.eval_batch,
        True) + ".json")  # True: a cache-key field kept from when the learned rows were optional
    done = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            done = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    results = seed_rows(config, trainers, trunk, pretrained_shared, tasks, seed, folder, done)
    with open(results_path, "w") as f:
        json.dump({**done, **results}, f, default=float)
    return results


def seed_rows(config, trainers, trunk, pretrained_shared, tasks, seed: int, folder: str, done: dict) -> dict:
    """The rows of :func:`run_seed` (checkpoints cached under ``folder``); method rows already in
    ``done`` (the JSON form) are reused, the baselines are always re-evaluated."""
    names = [t.name for t in tasks]
    rows, timings = {}, {}
    val = [eval_set(t.splits["val"][0][: config.merge.val_per_task], t.splits["val"][1][: config.merge.val_per_task],
                    config.eval_batch) for t in tasks]
    test = [eval_set(*t.splits["test"], config.eval_batch) for t in tasks]

    t0 = time.time()
    probes = [cached(os.path.join(folder, f"probe_{t.name}.npz"), init_head(jax.random.key(0), trunk.dim, t.num_classes),
                     lambda t=t, i=i: linear_probe(config, trainers, trunk, pretrained_shared, t, 100 * seed + i))
              for i, t in enumerate(tasks)]
    timings["probe"] = time.time() - t0
    rows["Pretrained (linear probe)"] = ({}, np.array([accuracy(trunk, pretrained_shared, h, d)
                                                       for h, d in zip(probes, test)]))
    t0 = time.time()
    finetuned = [cached(os.path.join(folder, f"finetuned_{t.name}.npz"),
                        {"shared": pretrained_shared, "heads": {t.name: probes[i]}},
                        lambda t=t, i=i: finetune(config, trainers, pretrained_shared, probes[i], t, 100 * seed + i))
                 for i, t in enumerate(tasks)]
    timings["finetune"] = time.time() - t0
    heads = [ft["heads"][t.name] for ft, t in zip(finetuned, tasks)]
    rows["Individual (fine-tuned)"] = ({}, np.array([accuracy(trunk, ft["shared"], h, d)
                                                     for ft, h, d in zip(finetuned, heads, test)]))
    t0 = time.time()
    mtl = cached(os.path.join(folder, f"multitask-{settings_hash(config.multitask.to_dict())}.npz"), {"shared": pretrained_shared, "heads": dict(zip(names, probes))},
                 lambda: multitask_train(config, trainers, pretrained_shared, dict(zip(names, probes)), tasks, seed))
    timings["multitask"] = time.time() - t0
    rows["Multi-task trained"] = ({}, np.array([accuracy(trunk, mtl["shared"], mtl["heads"][t.name], d)
                                                for t, d in zip(tasks, test)]))
    for name in ("Pretrained (linear probe)", "Individual (fine-tuned)", "Multi-task trained"):
        log(f"seed {seed} {name}: test accuracy {np.round(rows[name][1], 4).tolist()} (timings {timings})")

    ctx = Context(trunk, pretrained_shared, to_merge_space(pretrained_shared),
                  [to_merge_space(ft["shared"]) for ft in finetuned], heads, val, test,
                  np.array([accuracy(trunk, ft["shared"], h, d) for ft, h, d in zip(finetuned, heads, val)]))
    n_stats = config.merge.stats_examples

    @functools.cache
    def statistics():
        t0 = time.time()
        out = {
            "fisher": [to_merge_space(fisher_diagonal(trunk, ft["shared"], h, jnp.asarray(t.splits["train"][0][:n_stats]),
                                                      jax.random.key(seed * 100 + i)))
                       for i, (ft, h, t) in enumerate(zip(finetuned, heads, tasks))],
            "grams": [regmean_grams(trunk, ft["shared"], jnp.asarray(t.splits["train"][0][:n_stats]))
                      for ft, t in zip(finetuned, tasks)],
        }
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
        log(f"seed {seed} {name}: mean test accuracy {rows[name][1].mean():.4f} ({timings[name]:.1f} s)")
    computed = {name: {"acc": acc.tolist(), "normalised": (acc / np.array(rows["Individual (fine-tuned)"][1])).tolist(),
                       "hparams": hp, "seconds": round(timings.get(name, 0.0), 2)}
                for name, (hp, acc) in rows.items()}
    reused = {name: done[name] for name in methods if name in wanted and name in done}
    return computed | reused | {"_timings": {k: round(v, 2) for k, v in timings.items()},
                                "_task_vectors": task_vector_diagnostics(ctx, ta_lambda())}


def task_vector_diagnostics(ctx: Context, lam: float) -> dict:
    """:func:`task_vector_geometry` and :func:`function_interference` from one stacked task-vector tree."""
    stacked = M.stacked_task_vectors(ctx.finetuned, ctx.pretrained)
    return task_vector_geometry(ctx, stacked) | function_interference(ctx, stacked, lam)


def function_interference(ctx: Context, stacked, lam: float) -> dict:
    """Interference in function space at task arithmetic's validated ``lam``, per task t on its test split:
    accuracy of the task's own edit ``theta_0 + lam tau_t`` and of the TA merge, and the fraction of test
    examples whose predicted class differs between the two (the weight-disentanglement error of
    Ortiz-Jimenez et al., NeurIPS 2023, with the 0-1 distance between predictions). ``stacked``: the
    (T, ...) backbone task vectors."""
    merged = from_merge_space(M.apply_task_vector(ctx.pretrained, M.task_arithmetic_vector(stacked, lam)), ctx.template)
    own_acc, merged_acc, disagree = [], [], []
    for t, (head, data) in enumerate(zip(ctx.heads, ctx.test)):
        own = from_merge_space(M.apply_task_vector(ctx.pretrained, M.task_slice(stacked, t), lam), ctx.template)
        pred_own, pred_merged = (predict_all(ctx.trunk, tree, head, data) for tree in (own, merged))
        own_acc.append(float(np.mean(pred_own == data.y)))
        merged_acc.append(float(np.mean(pred_merged == data.y)))
        disagree.append(float(np.mean(pred_own != pred_merged)))
    return {"ta_lambda": lam, "own_edit_acc": own_acc, "ta_acc": merged_acc, "disagreement": disagree}


def task_vector_geometry(ctx: Context, stacked) -> dict:
    """Pairwise cosines of the backbone task vectors ``stacked`` (T, ...) [T, T] and each one's norm
    relative to the pretrained backbone's (the interference diagnostic of Ilharco et al. 2023)."""
    gram = M.task_vector_gram(stacked)
    base = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(ctx.pretrained))))
    return {"cosine": np.round(np.asarray(M.gram_cosines(gram)), 4).tolist(),
            "relative_norm": np.round(np.sqrt(np.diag(np.asarray(gram))) / base, 4).tolist()}


# ---------------------------------------------------------------------------------------- report

PER_TASK_ROWS = ("TALL-mask retrieval", "EMR")


def fmt(values, scale: float = 100.0) -> str:
    values = np.asarray(values, float) * scale
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def markdown_table(results: dict, names: Sequence[str], key: str) -> str:
    """One row per method: per-task and average ``key`` ("acc" / "normalised") in %, mean ± std over
    seeds (the average is taken per seed, then over seeds)."""
    seeds = list(results)
    rows = [n for n in results[seeds[0]] if not n.startswith("_")]
    lines = ["| method | " + " | ".join(names) + " | avg |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        per_seed = np.array([results[s][row][key] for s in seeds])  # [S, T]
        cells = [fmt(per_seed[:, t]) for t in range(len(names))] + [fmt(per_seed.mean(axis=1))]
        label = f"{row} (per-task models)" if row in PER_TASK_ROWS else row
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption(config, tasks, pretrain_log: dict, wall: float) -> str:
    sizes = ", ".join(f"{t.name} {len(t.splits['train'][1])}/{len(t.splits['val'][1])}/{len(t.splits['test'][1])}"
                      for t in tasks)
    m = config.model
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        jax.eval_shape(ViT(**m).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))))
    tuned = "backbone (head frozen at the probe)" if config.freeze_heads else "backbone + head"
    return (
        f"ViT ({num_params / 1e6:.2f}M parameters; patch {m.patch_size}, dim {m.dim}, {m.depth} blocks, "
        f"{m.num_heads} heads, MLP {m.mlp_dim}; "
        f"28x28 inputs, {(28 // m.patch_size) ** 2} tokens) pretrained by rotation prediction on "
        f"{pretrain_log['pretext_images']} unlabelled train images x 4 rotations ({config.pretrain.steps} steps, batch "
        f"{config.pretrain.batch_size}; pretext loss {pretrain_log['loss_first']:.2f} -> {pretrain_log['loss_last']:.2f}). "
        f"Tasks (train/val/test): {sizes}. Pretrained = linear probe on the frozen trunk ({config.probe.steps} "
        f"full-batch Adam steps), standing in for CLIP's zero-shot head; individual = {tuned} fine-tuned "
        f"from the probe ({config.finetune.steps} steps, batch {config.finetune.batch_size}, AdamW "
        f"{config.finetune.optim.lr} cosine); multi-task = {tuned}, {config.multitask.steps} steps with a batch "
        f"of {config.multitask.batch_size} from every task (sum of losses). Merging acts on the backbone; every task "
        f"keeps its {'probe' if config.freeze_heads else 'fine-tuned'} head. Hyperparameters (lambda, alpha, beta) chosen per seed by mean normalised "
        f"accuracy on {config.merge.val_per_task} validation images per task; TALL masks pick lambda_t per task "
        f"on its own validation images; Fisher / RegMean use {config.merge.stats_examples} train images per task; "
        f"AdaMerging: {config.learned.steps} Adam steps (paper: 500) on batches of {config.learned.batch_per_task} "
        f"unlabelled test images per task from a pool of {config.learned.pool_per_task}; aTLAS: "
        f"{config.learned.atlas_steps} steps on {config.learned.atlas_examples_per_task} labelled validation images "
        f"per task; Self Positioning: {config.learned.sp_steps} SGD steps (lr {config.learned.sp_lr}) on the same "
        f"labelled images, task-wise coefficients from the plain average. Seeds {tuple(config.seeds)} vary probes, "
        f"fine-tuning, multi-task training and DARE (one pretrained trunk, as the papers use one CLIP). Differences "
        f"from the papers' ViT-B/32 setup: a {num_params / 1e6:.2f}M-parameter ViT instead of 88M, self-supervised pretraining on "
        f"~5k digit images instead of CLIP on 400M image-text pairs, "
        f"digit-derived tasks instead of SUN397/Cars/..., linear-probe instead of zero-shot heads"
        f"{'' if config.freeze_heads else ', heads fine-tuned (the papers freeze the text head)'}, attention q/k/v/out viewed as 2-D matrices for TSV-M / Iso / RegMean. "
        f"SLERP is pairwise and not run (Multi-SLERP, uniform weights, is its T-model form). This invocation: {wall / 60:.1f} min wall, {cpu_seconds() / 60:.1f} CPU-min "
        f"(2-core machine shared with other jobs; stages loaded from the cache cost neither)."
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (the machine is shared: wall time overstates cost)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def task_vector_report(results: dict, names: Sequence[str]) -> str:
    """Mean / max off-diagonal cosine and mean relative norm per seed, then seed 0's cosine matrix."""
    seeds = [s for s in results if "_task_vectors" in results[s]]
    if not seeds:
        return "(not recorded)"
    lines = []
    for s in seeds:
        cos = np.array(results[s]["_task_vectors"]["cosine"])
        off = cos[~np.eye(len(cos), dtype=bool)]
        i, j = np.unravel_index(np.argmax(np.where(np.eye(len(cos), dtype=bool), -np.inf, cos)), cos.shape)
        tv = results[s]["_task_vectors"]
        lines.append(f"- seed {s}: off-diagonal cosine mean {off.mean():.3f} (min {off.min():.3f}, max {off.max():.3f}: "
                     f"{names[i]} / {names[j]}); ||tau_t|| / ||theta_0|| mean {np.mean(tv['relative_norm']):.3f}"
                     + (f"; at TA's lambda {tv['ta_lambda']}: own edit theta_0 + lambda tau_t "
                        f"{100 * np.mean(tv['own_edit_acc']):.1f}%, TA merge {100 * np.mean(tv['ta_acc']):.1f}%, "
                        f"predictions that differ {100 * np.mean(tv['disagreement']):.1f}%" if "disagreement" in tv else ""))
    cos = np.array(results[seeds[0]]["_task_vectors"]["cosine"])
    lines += ["", f"Cosine matrix, seed {seeds[0]}:", "", "| | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for n, row in zip(names, cos)]
    return "\n".join(lines)


def write_report(config, results: dict, tasks, pretrain_log: dict, wall: float) -> str:
    names = [t.name for t in tasks]
    text = "\n\n".join([
        "# ViT model merging on 8 real-digit tasks",
        caption(config, tasks, pretrain_log, wall),
        "## Absolute test accuracy (%)",
        markdown_table(results, names, "acc"),
        "## Normalised accuracy (% of the individual fine-tuned model on each task)",
        markdown_table(results, names, "normalised"),
        "## Task vectors (backbone)",
        task_vector_report(results, names),
        "## Selected hyperparameters per seed",
        "\n".join(f"- {row}: " + "; ".join(f"seed {s}: {json.dumps(results[s][row]['hparams'])}" for s in results)
                  for row in results[next(iter(results))] if not row.startswith("_") and results[next(iter(results))][row]["hparams"]),
    ]) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
    with open(config.out + ".md", "w") as f:
        f.write(text)
    with open(config.out + ".json", "w") as f:
        json.dump({"config": config.to_dict(), "pretrain": pretrain_log, "wall_seconds": wall,
                   "process_cpu_seconds": cpu_seconds(),
                   "results": {str(s): r for s, r in results.items()}}, f, indent=1, default=float)
    return text


def pretrained_trunk(config, trunk, sources, tasks) -> tuple[dict, dict, str]:
    """The rotation-pretrained trunk for ``config`` (built once, cached under ``config.workdir`` by a
    hash of its settings): (params, pretraining log, cache folder)."""
    pre_key = settings_hash(config.model.to_dict(), config.pretrain.to_dict(), sorted(sources), config.data_seed,
                            config.max_train)
    cache_dir = os.path.join(config.workdir, f"pretrain-{pre_key}")
    template = jax.eval_shape(trunk.init, jax.random.key(0), tasks[0].splits["train"][0][:1])["params"]
    log_path = os.path.join(cache_dir, "pretrain_log.json")
    pretrain_log = {}

    def build():
        shared, log = pretrain(config, trunk, sources)
        pretrain_log.update(log)
        return shared

    pretrained = cached(os.path.join(cache_dir, "pretrained.npz"), template, build)
    if pretrain_log:
        with open(log_path, "w") as f:
            json.dump(pretrain_log, f, default=float)
    with open(log_path) as f:
        pretrain_log = json.load(f)
    return pretrained, pretrain_log, cache_dir


def run_benchmark(config) -> dict:
    """The whole pipeline for ``config`` (see configs/merge/vit_benchmark.py); returns
    ``{"results": {seed: rows}, "tasks": names, "table": markdown}``."""
    start = time.time()
    sources = task_lib.load_sources(task_lib.sources_of(config.tasks), config.data_seed)
    tasks = task_lib.build_tasks(config.tasks, sources, config.data_seed, config.max_train, config.max_eval)
    trunk = ViT(**config.model)
    trainers = build_trainers(config, trunk)
    pretrained, pretrain_log, cache_dir = pretrained_trunk(config, trunk, sources, tasks)
    log(f"pretrained trunk: {pretrain_log} ({time.time() - start:.1f} s since start)")
    cache_dir = os.path.join(cache_dir, settings_hash([(t.name, len(t.splits["train"][1])) for t in tasks]))
    results = {s: run_seed(config, trainers, trunk, pretrained, tasks, s, cache_dir) for s in config.seeds}
    table = write_report(config, results, tasks, pretrain_log, time.time() - start)
    return {"results": results, "tasks": [t.name for t in tasks], "table": table}


def parse_config(argv, description: str):
    """``--config FILE[:ARG]`` (default configs/merge/vit_benchmark.py) + ``--config.a.b=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=CONFIG, help="FILE[:ARG], e.g. configs/merge/vit_benchmark.py:smoke")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; overrides look like --config.a.b=value")
    config = config_from_file(args.config)
    apply_overrides(config, [a[len("--config."):] for a in rest], free_form=())
    return config


def main(argv=None):
    config = parse_config(argv, __doc__.splitlines()[0])
    out = run_benchmark(config)
    print(out["table"])


if __name__ == "__main__":
    from mtl_jax.host_memory import reuse_freed_memory

    reuse_freed_memory()  # as `mtl-jax train`: before JAX starts its CPU threads
    main()
