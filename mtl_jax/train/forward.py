"""The training and evaluation forward: per-task losses, metrics, and the trunk / heads split.

``make_forward`` runs the model and returns the per-task losses ``L [K]`` (each over the examples
labelled for its task, plus the auxiliary losses the model sows); ``make_representation_forward``
splits a trunk + heads model into ``encode`` (the shared representation ``z``) and ``decode`` (the
heads' losses), for the gradient strategies that differentiate the heads once.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.models.moe_layers import AUX_LOSS
from mtl_jax.train.dense_metrics import Accumulated
from mtl_jax.train.losses import task_loss_fn, task_metric_fns
from mtl_jax.train.precision import FLOAT32, Precision, cast_input, cast_params, to_float32


def labelled(task, labels) -> jax.Array | None:
    """bool [B]: which examples are labelled for a classification task (label >= 0; a negative
    label marks an example of another task in heterogeneous data); None for other tasks (all)."""
    return labels >= 0 if task.kind == "classification" else None


def make_task_losses(tasks: Sequence) -> Callable:
    """``task_losses(predictions, batch) -> [K]``: each task's mean loss over its labelled examples
    (``labelled``; every example when all are labelled), in task order."""
    loss_fns = [(t, t.label_key, task_loss_fn(t)) for t in tasks]

    def task_loss(task, fn, pred, labels):
        mask = labelled(task, labels)
        if mask is None:
            return fn(pred, labels).mean()
        per_example = fn(pred, jnp.where(mask, labels, 0))
        return jnp.where(mask, per_example, 0.0).sum() / jnp.maximum(mask.sum(), 1).astype(per_example.dtype)

    return lambda preds, batch: jnp.stack([task_loss(t, fn, preds[t.name], batch[label]) for t, label, fn in loss_fns])


def task_mask(tasks: Sequence, batch) -> jax.Array:
    """float32 [B, K]: 1 where example b is labelled for task k (``labelled``)."""
    masks = [labelled(t, batch[t.label_key]) for t in tasks]
    size = batch[tasks[0].label_key].shape[0]
    return jnp.stack([jnp.ones((size,), bool) if m is None else m for m in masks], axis=1).astype(jnp.float32)


def aux_task_losses(aux, num_tasks: int):
    """[K]: the auxiliary losses a model sowed (``aux_loss`` collection, e.g. MoE load balancing):
    [K] leaves are per-task terms added to task k's loss, scalar leaves are split equally over the
    K tasks. So sum_k L_k holds every auxiliary loss once; a gradient method sees task k's share
    in its task gradient g_k (its own router's terms and 1/K of the shared ones)."""
    per_task = [a for a in jax.tree.leaves(aux) if a.ndim == 1]
    shared = [a for a in jax.tree.leaves(aux) if a.ndim == 0]
    return sum(per_task, jnp.zeros((num_tasks,), jnp.float32)) + sum(shared, jnp.zeros((), jnp.float32)) / num_tasks


def takes(model, argument: str) -> bool:
    """Whether the model's ``__call__`` takes ``argument`` (e.g. 'task_mask', 'targets')."""
    return argument in inspect.signature(type(model).__call__).parameters


def training_targets(tasks: Sequence, batch) -> dict:
    """``{task name: label batch}``: what a model that takes ``targets`` gets in training (a head
    may add a loss on its task's label, e.g. AiT's token loss; ``models/ait.py``)."""
    return {t.name: batch[t.label_key] for t in tasks}


def make_forward(model, tasks: Sequence, input_key: str, precision: Precision = FLOAT32) -> Callable:
    """``forward(params, model_state, batch, key, train) -> (losses [K], (predictions, model_state))``.

    In training, auxiliary losses the model sows into the ``aux_loss`` collection are added to
    the task losses (``aux_task_losses``). A model whose ``__call__`` takes ``task_mask`` gets
    ``task_mask(tasks, batch)`` (which examples are labelled for which task); one that takes
    ``targets`` gets ``training_targets(tasks, batch)`` in training only (evaluation reads no label
    through the model), e.g. for AiT's token loss (``models/ait.py``). ``precision``: the
    parameters and input are cast to its compute dtype, the predictions back to float32
    (``train/precision.py``).
    """
    task_losses = make_task_losses(tasks)
    wants_mask = takes(model, "task_mask")
    wants_targets = takes(model, "targets")

    def forward(params, model_state, batch, key, train: bool):
        variables = {"params": cast_params(precision, params), **model_state}
        rngs = {"dropout": key}
        kwargs = {"task_mask": task_mask(tasks, batch)} if wants_mask else {}
        inputs = cast_input(precision, batch[input_key])
        aux = {}
        if train:
            if wants_targets:
                kwargs["targets"] = training_targets(tasks, batch)
            preds, updated = model.apply(variables, inputs, train=True, rngs=rngs,
                                         mutable=list(model_state) + [AUX_LOSS], **kwargs)
            updated = dict(updated)
            aux = to_float32(updated.pop(AUX_LOSS, {}))
            model_state = updated if model_state else model_state
        else:
            preds = model.apply(variables, inputs, train=train, rngs=rngs, **kwargs)
        preds = to_float32(preds) if precision.mixed else preds
        losses = task_losses(preds, batch)
        return (losses + aux_task_losses(aux, len(tasks)) if aux else losses), (preds, model_state)

    return forward


def _task_metrics(task, pred, labels, mask) -> tuple[dict, jax.Array]:
    """``({metric: sum}, count)`` over the examples with ``mask`` [B] 1 that are labelled for the task
    (``labelled``): a per-example metric's sum of values, an accumulated metric's ``stats``
    (``dense_metrics.Accumulated``); ``count`` is how many examples counted (float32)."""
    is_labelled = labelled(task, labels)
    weight = mask if is_labelled is None else mask * is_labelled.astype(jnp.float32)
    labels = labels if is_labelled is None else jnp.where(is_labelled, labels, 0)  # dummy 0 where unlabelled
    pred = jax.lax.stop_gradient(pred)
    sums = {metric: fn.stats(pred, labels, weight) if isinstance(fn, Accumulated) else (fn(pred, labels) * weight).sum()
            for metric, fn in task_metric_fns(task).items()}
    return sums, weight.sum()


def batch_metrics(tasks: Sequence, preds, batch) -> dict:
    """``{task: {metric: value on the batch's examples labelled for the task}}``: a per-example metric's
    mean (0 when none are labelled), an accumulated metric finalised on the batch's statistics."""
    out = {}
    for t in tasks:
        labels = batch[t.label_key]
        sums, count = _task_metrics(t, preds[t.name], labels, jnp.ones(labels.shape[:1], jnp.float32))
        fns = task_metric_fns(t)
        out[t.name] = {m: fns[m].finalize(v) if isinstance(fns[m], Accumulated) else v / jnp.maximum(count, 1.0)
                       for m, v in sums.items()}
    return out


def metric_sums(tasks: Sequence, preds, batch, mask) -> tuple[dict, dict]:
    """``({task: {metric: sum}}, {task: count})`` over the examples that are real (``mask`` [B], 0 on
    padding) and labelled for the task: a per-example metric's sum of values, an accumulated metric's
    summed statistics (a pytree). Summed over the batches of a split, a per-example metric's mean is
    its sum over the count, an accumulated one is ``finalize(sum)`` (``dense_metrics.finalize_sums``)."""
    sums, counts = {}, {}
    for t in tasks:
        sums[t.name], counts[t.name] = _task_metrics(t, preds[t.name], batch[t.label_key], mask)
    return sums, counts


def has_representation(model) -> bool:
    """Whether ``model`` has one shared representation (trunk + heads: ``HardParameterSharing``)."""
    return hasattr(model, "trunk") and hasattr(model, "heads")


class Decode(NamedTuple):
    """The heads of a trunk + heads model and their losses (``make_representation_forward``).

    ``heads(head_params, z, key, train, per_task=False) -> predictions`` (``per_task``: ``z`` is
    ``{task: z_t}`` and head t reads its own copy); ``losses(predictions, batch) -> [K]``. Called as
    ``decode(head_params, z, batch, key, train, per_task=False) -> (losses [K], predictions)``.
    """

    heads: Callable
    losses: Callable

    def __call__(self, head_params, z, batch, key, train, per_task=False):
        preds = self.heads(head_params, z, key, train, per_task)
        return self.losses(preds, batch), preds


def make_representation_forward(model, tasks: Sequence, input_key: str, precision: Precision = FLOAT32):
    """``(encode, decode)`` for representation-level gradients (LibMTL's ``rep_grad``, MGDA-UB).

    ``encode(shared_params, batch, key, train) -> z`` is the trunk; ``decode`` a :class:`Decode`: the
    heads (``decode.heads``) and their losses (``decode.losses``), callable as ``decode(head_params, z,
    batch, key, train, per_task=False) -> (losses [K], predictions)``. Both run the model's own
    ``stage``s, so with the same key their dropout masks are those of the whole model's forward. Needs a
    hard-parameter-sharing model (one shared representation) without mutable state. ``precision`` as
    in ``make_forward`` (``z`` stays in the compute dtype).
    """
    if not has_representation(model):
        raise ValueError(f"representation-level gradients need a model with one shared representation (trunk + "
                         f"heads, e.g. 'hps'); got {type(model).__name__}")

    def encode(shared_params, batch, key, train):
        shared_params = cast_params(precision, {"shared": shared_params})["shared"]
        return model.apply({"params": {"shared": shared_params}}, cast_input(precision, batch[input_key]), train,
                           stage="trunk", rngs={"dropout": key})

    def heads(head_params, z, key, train, per_task=False):
        head_params = cast_params(precision, {"heads": head_params})["heads"]
        preds = model.apply({"params": {"heads": head_params}}, z, train, stage="heads", per_task=per_task,
                            rngs={"dropout": key})
        return to_float32(preds) if precision.mixed else preds

    return encode, Decode(heads, make_task_losses(tasks))


def sows_aux_loss(model, params, batch, input_key: str, tasks: Sequence) -> bool:
    """Whether the model's training forward sows auxiliary losses (traced by ``jax.eval_shape``).

    A model that takes ``targets`` gets ``training_targets(tasks, batch)`` as in ``make_forward`` (a
    head's loss on its label, e.g. AiT's token loss, is sown only with them)."""
    kwargs = {"targets": training_targets(tasks, batch)} if takes(model, "targets") else {}
    _, out = jax.eval_shape(lambda p, x, kw: model.apply({"params": p}, x, train=True, mutable=[AUX_LOSS],
                                                         rngs={"dropout": jax.random.key(0)}, **kw),
                            params, batch[input_key], kwargs)
    return bool(jax.tree.leaves(out))

