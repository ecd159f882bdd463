"""Training stages of the ViT merging benchmark: rotation pretraining, linear probes, fine-tuning
(LP-FT, Kumar et al. 2022) and multi-task training, with the model pieces they share.

The model is a ``mtl_jax.models.trunks.ViT`` trunk (params ``shared``) and one ``LinearHead`` per
task (params ``heads[task]``). Every stage is a plain optax loop over host-sampled batches of one
jitted step; :func:`build_trainers` makes those steps once per run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments.merging import tasks as task_lib
from mtl_jax.models.heads import LinearHead
from mtl_jax.models.trunks import ViT
from mtl_jax.train.losses import cross_entropy
from mtl_jax.train.optim import make_optimizer

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


class EvalSet(NamedTuple):
    """Images padded to whole batches of one fixed size (one compile for every split), on device,
    [NB, B, 28, 28, 1]; labels (numpy, unpadded)."""

    x: jax.Array
    y: np.ndarray


def eval_set(x: np.ndarray, y: np.ndarray, batch: int) -> EvalSet:
    pad = -len(x) % batch
    xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    return EvalSet(jnp.asarray(xp.reshape((-1, batch) + x.shape[1:])), y)


# ------------------------------------------------------------------------------------ optimisation


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


# ------------------------------------------------------------------------------------------ stages


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
    """Linear head on frozen pretrained features of the task's train split (full-batch Adam); with
    ``config.probe.max_examples`` > 0, of its first that many examples."""
    x, y = task.splits["train"]
    keep = config.probe.get("max_examples", 0)
    x, y = (x[:keep], y[:keep]) if keep else (x, y)
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


def pretrained_trunk(config, trunk, sources, tasks) -> tuple[dict, dict, str]:
    """The rotation-pretrained trunk for ``config`` (built once, cached under ``config.workdir`` by a
    hash of its settings): (params, pretraining log, cache folder)."""
    pre_key = common.settings_hash(config.model.to_dict(), config.pretrain.to_dict(), sorted(sources),
                                   config.data_seed, config.max_train)
    cache_dir = os.path.join(config.workdir, f"pretrain-{pre_key}")
    template = jax.eval_shape(trunk.init, jax.random.key(0), tasks[0].splits["train"][0][:1])["params"]
    log_path, tree_path = os.path.join(cache_dir, "pretrain_log.json"), os.path.join(cache_dir, "pretrained.npz")
    if os.path.exists(tree_path) and not os.path.exists(log_path):
        raise ValueError(f"{tree_path} has no pretrain_log.json beside it (an interrupted run); move {cache_dir} "
                         "aside to pretrain again")

    def build():
        shared, log = pretrain(config, trunk, sources)
        common.write_json(log_path, log, default=float)  # before the tree: a cached tree always has its log
        return shared

    pretrained = common.cached_tree(tree_path, template, build)
    return pretrained, common.read_json(log_path), cache_dir


class Setup(NamedTuple):
    """What every experiment on the benchmark starts from (:func:`setup`)."""

    tasks: list  # task_lib.Task per config.tasks
    trunk: Any  # ViT, or FrozenStatsTrunk for a real pretrained backbone
    trainers: Trainers
    pretrained: dict  # the rotation-pretrained (or loaded pretrained) trunk params
    pretrain_log: dict
    cache_dir: str  # the pretrained trunk's cache folder


def setup(config) -> Setup:
    """The tasks of ``config``, its trunk and jitted steps, and the pretrained trunk (from the cache
    under ``config.workdir`` when an earlier run built it)."""
    sources = task_lib.load_sources(task_lib.sources_of(config.tasks), config.data_seed)
    tasks = task_lib.build_tasks(config.tasks, sources, config.data_seed, config.max_train, config.max_eval)
    trunk = ViT(**config.model)
    trainers = build_trainers(config, trunk)
    return Setup(tasks, trunk, trainers, *pretrained_trunk(config, trunk, sources, tasks))


# ------------------------------------------------------------------------------ pretrained trunks


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenStatsTrunk:
    """A pretrained backbone as the benchmark's trunk: ``apply({"params": p}, x) -> [B, dim]`` runs
    ``module`` in inference mode (no dropout / drop connect; BatchNorm on its running statistics)
    with the extra variable collections ``constants`` (EfficientNet's ``batch_stats``) held fixed,
    so fine-tuning, merging and every statistic act on ``params`` alone (frozen BatchNorm statistics,
    the usual recipe when fine-tuning on small batches). Hashed by identity: a static jit argument,
    like the linen trunks."""

    module: nn.Module
    dim: int
    constants: Any = None  # {collection: tree} or None

    def apply(self, variables, x, **kwargs):
        return self.module.apply({**variables, **(self.constants or {})}, x, **kwargs)

    def init(self, key, x):
        return self.module.init(key, x)


PRETRAINED_BACKBONES = ("minilm_l6", "efficientnet_lite0", "bert_tiny_random")


def load_backbone(name: str) -> tuple[FrozenStatsTrunk, dict]:
    """(trunk, pretrained params) of ``name``: ``minilm_l6`` (all-MiniLM-L6-v2, mean-pooled, 384),
    ``efficientnet_lite0`` (ImageNet EfficientNet-Lite0 without its classifier, pooled, 1280), or
    ``bert_tiny_random`` (a 2-layer, 16-wide BERT on MiniLM's vocabulary, randomly initialised: tests)."""
    if name == "bert_tiny_random":
        from mtl_jax.models.pretrained.bert import BertEncoder

        module = BertEncoder(hidden=16, layers=2, heads=2, intermediate=32, max_position=64)
        return FrozenStatsTrunk(module, module.hidden), jax.jit(module.init)(
            jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    if name == "minilm_l6":
        from mtl_jax.models.pretrained.bert import load_minilm

        module, params, _ = load_minilm()
        return FrozenStatsTrunk(module, module.hidden), params
    if name == "efficientnet_lite0":
        from mtl_jax.models.pretrained.efficientnet_lite import HEAD_FEATURES, load_efficientnet_lite0

        module, variables = load_efficientnet_lite0(num_classes=0)
        variables = jax.device_put(variables)
        return FrozenStatsTrunk(module, HEAD_FEATURES, {"batch_stats": variables["batch_stats"]}), variables["params"]
    raise ValueError(f"unknown pretrained backbone {name!r}; valid: {list(PRETRAINED_BACKBONES)}")


def pretrained_setup(config, tasks) -> Setup:
    """:class:`Setup` for a real pretrained backbone ``config.backbone`` (:func:`load_backbone`) on
    ``tasks``: no pretraining stage (the pretrain log records the backbone), the cache folder under
    ``config.workdir`` keyed by the backbone and the tasks' sizes."""
    trunk, params = load_backbone(config.backbone)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    key = common.settings_hash(config.backbone, [(t.name, t.num_classes) + tuple(
        (s, len(y)) for s, (_, y) in t.splits.items()) for t in tasks], config.data_seed)
    log = {"backbone": config.backbone, "parameters": num_params}
    return Setup(tasks, trunk, build_trainers(config, trunk), params, log,
                 os.path.join(config.workdir, f"{config.backbone}-{key}"))
