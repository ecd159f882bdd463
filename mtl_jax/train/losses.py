"""Per-example losses and metrics. Registries are plain dicts keyed by the names a TaskSpec uses.

Every function maps ``(prediction [B, ...], target [B, ...]) -> [B]`` (one value per example), so the
trainer can average with a mask (padded evaluation batches) and sum over hosts.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mtl_jax.registry import lookup


def cross_entropy(logits, labels):
    """Softmax cross-entropy; logits [B, C], integer labels [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.astype(jnp.int32))


def _per_example(x):
    return x.reshape(x.shape[0], -1).mean(axis=1)


def mse(pred, target):
    """Mean squared error over all non-batch dims; pred and target [B, ...] (target reshaped to pred)."""
    return _per_example(jnp.square(pred.astype(jnp.float32) - target.reshape(pred.shape)))


def l1(pred, target):
    """Mean absolute error over all non-batch dims."""
    return _per_example(jnp.abs(pred.astype(jnp.float32) - target.reshape(pred.shape)))


def accuracy(logits, labels):
    """1.0 where argmax(logits) == label, else 0.0; [B]."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def _value_and_mask(pred, target):
    """target [B, ..., 2] = (value, mask) reshaped to pred [B, ...] -> (error, value, mask), float32."""
    target = target.reshape(pred.shape + (2,)).astype(jnp.float32)
    value, mask = target[..., 0], target[..., 1]
    return pred.astype(jnp.float32) - value, value, mask


def _masked_sum(x, mask):
    return (x * mask).reshape(x.shape[0], -1).sum(axis=1)


def masked_mse(pred, target):
    """Mean squared error over the points where the mask is 1 (MT-DeepONet's geometry-masked loss,
    Kumar et al. 2024, the Darcy example): pred [B, ...], target [B, ..., 2] (value, mask) -> [B];
    points with mask 0 do not count (an all-zero mask gives 0)."""
    err, _, mask = _value_and_mask(pred, target)
    return _masked_sum(jnp.square(err), mask) / jnp.maximum(_masked_sum(jnp.ones_like(mask), mask), 1.0)


def relative_l2(pred, target):
    """Relative L2 error ``||m (pred - u)|| / ||m u||`` per example (operator-learning's test metric);
    target [B, ..., 2] = (u, mask m) -> [B]."""
    err, value, mask = _value_and_mask(pred, target)
    return jnp.sqrt(_masked_sum(jnp.square(err), mask) / jnp.maximum(_masked_sum(jnp.square(value), mask), 1e-12))


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "l1": l1, "masked_mse": masked_mse}
METRICS = {"accuracy": accuracy, "mae": l1, "mse": mse, "loss": None,  # 'loss' = the task's own loss
           "masked_mse": masked_mse, "relative_l2": relative_l2}
HIGHER_IS_BETTER = {"accuracy": True, "mae": False, "mse": False, "loss": False, "masked_mse": False,
                    "relative_l2": False}


def task_loss_fn(task):
    return lookup(LOSSES, task.loss, f"loss of task '{task.name}'")


def task_metric_fns(task) -> dict:
    """{metric name: per-example fn} for a TaskSpec ('loss' resolves to the task's loss)."""
    loss = task_loss_fn(task)
    return {m: (lookup(METRICS, m, f"metric of task '{task.name}'") or loss) for m in task.metrics}
