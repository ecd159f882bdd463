"""Losses and metrics. Registries are plain dicts keyed by the names a TaskSpec uses.

Every loss and per-example metric maps ``(prediction [B, ...], target [B, ...]) -> [B]`` (one value
per example), so the trainer can average with a mask (padded evaluation batches) and sum over hosts.
A metric that is not a mean over examples (mIoU, the median angle, F1) is an
``dense_metrics.Accumulated`` (statistics summed over the split, finalised once).

The dense losses are LibMTL's (``examples/nyu/utils.py``: ``SegLoss``, ``DepthLoss``, ``NormalLoss``;
the MTAN repository's ``model_fit`` is the same): each is a mean over the *batch's* valid pixels,
``sum_b S_b / sum_b N_b`` (``S_b``: example b's summed pixel loss, ``N_b``: its valid pixels). To fit the
per-example contract, example b's value is its share ``B * S_b / sum_b' N_b'``, so the batch mean of the
[B] values is LibMTL's loss exactly (the values of single examples are not pixel means; use the
``*_sums`` functions for those). A batch without a valid pixel has loss 0 (LibMTL's is NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_jax.registry import lookup
from mtl_jax.train import dense_metrics


def integer_label_cross_entropy(logits, labels):
    """Softmax cross-entropy ``logsumexp(logits) - logits[label]`` over the last axis; logits [..., C],
    integer labels [...] in [0, C). optax's ``softmax_cross_entropy_with_integer_labels`` with the label
    logit picked by a one-hot select instead of ``take_along_axis``: the same values, and a gradient that
    is an elementwise select instead of a scatter-add."""
    logits = logits.astype(jnp.float32)
    picked = labels.astype(jnp.int32)[..., None] == jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(picked, logits, 0.0), axis=-1)


def cross_entropy(logits, labels):
    """Softmax cross-entropy; logits [B, C], integer labels [B]."""
    return integer_label_cross_entropy(logits, labels)


def _per_example(x):
    return x.reshape(x.shape[0], -1).mean(axis=1)


def binary_cross_entropy(logits, labels):
    """Sigmoid binary cross-entropy of one logit per example; logits [B, 1] or [B], labels 1 / 0 [B]
    (``torch.nn.BCELoss`` on the sigmoid, FAMO's CelebA loss)."""
    logits = logits.reshape(logits.shape[0]).astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits, labels.reshape(logits.shape).astype(jnp.float32))


def binary_accuracy(logits, labels):
    """1.0 where (logit > 0) == (label == 1); [B]."""
    return ((logits.reshape(logits.shape[0]) > 0) == (labels.reshape(logits.shape[0]) == 1)).astype(jnp.float32)


def pixel_cross_entropy_sums(logits, labels):
    """``(sum [B], count [B])`` of the softmax cross-entropy over each example's pixels with a label in
    [0, C) (-1 = ignored); logits [B, H, W, C], integer labels [B, H, W]."""
    num_classes = logits.shape[-1]
    labels = labels.reshape(logits.shape[:-1]).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    ce = integer_label_cross_entropy(logits, jnp.where(valid, labels, 0))
    return _per_example_sum(jnp.where(valid, ce, 0.0)), _per_example_sum(valid.astype(jnp.float32))


def depth_l1_sums(pred, depth):
    """``(sum [B], count [B])`` of |pred - depth| over each example's valid pixels (depth != 0);
    pred [B, H, W, 1], depth [B, H, W, 1] (or [B, H, W])."""
    pred = pred.astype(jnp.float32)
    depth = depth.reshape(pred.shape).astype(jnp.float32)
    valid = depth != 0
    return _per_example_sum(jnp.where(valid, jnp.abs(pred - depth), 0.0)), _per_example_sum(valid.astype(jnp.float32))


def normal_cosine_sums(pred, normal):
    """``(sum [B], count [B])`` of 1 - cos(pred, normal) over each example's valid pixels (target
    components not summing to 0, LibMTL's mask); pred [B, H, W, 3] (L2-normalised here, as LibMTL
    does), normal [B, H, W, 3] unit vectors."""
    pred = pred.astype(jnp.float32)
    normal = normal.reshape(pred.shape).astype(jnp.float32)
    pred = pred * jax.lax.rsqrt(jnp.maximum(jnp.square(pred).sum(axis=-1, keepdims=True), 1e-24))
    valid = normal.sum(axis=-1) != 0
    cosine = (pred * normal).sum(axis=-1)
    return _per_example_sum(jnp.where(valid, 1.0 - cosine, 0.0)), _per_example_sum(valid.astype(jnp.float32))


def _per_example_sum(x):
    return x.reshape(x.shape[0], -1).sum(axis=1)


def batch_pixel_mean(sums_fn):
    """The [B] loss whose batch mean is ``sum_b S_b / max(sum_b N_b, 1)`` (LibMTL's batch pixel mean;
    module docstring) for ``sums_fn(pred, target) -> (S [B], N [B])``."""

    def loss(pred, target):
        total, count = sums_fn(pred, target)
        return total * (total.shape[0] / jnp.maximum(count.sum(), 1.0))

    return loss


pixel_cross_entropy = batch_pixel_mean(pixel_cross_entropy_sums)
depth_l1 = batch_pixel_mean(depth_l1_sums)
normal_cosine = batch_pixel_mean(normal_cosine_sums)


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


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "l1": l1, "masked_mse": masked_mse,
          "binary_cross_entropy": binary_cross_entropy, "pixel_cross_entropy": pixel_cross_entropy,
          "depth_l1": depth_l1, "normal_cosine": normal_cosine}
# the dense losses' (sum [B], count [B]) functions: their 'loss' metric is the split's pixel mean
PIXEL_LOSS_SUMS = {"pixel_cross_entropy": pixel_cross_entropy_sums, "depth_l1": depth_l1_sums,
                   "normal_cosine": normal_cosine_sums}
METRICS = {"accuracy": accuracy, "mae": l1, "mse": mse, "loss": None,  # 'loss' = the task's own loss
           "masked_mse": masked_mse, "relative_l2": relative_l2, "binary_accuracy": binary_accuracy,
           **dense_metrics.ACCUMULATED}
HIGHER_IS_BETTER = {"accuracy": True, "mae": False, "mse": False, "loss": False, "masked_mse": False,
                    "relative_l2": False, "binary_accuracy": True, **dense_metrics.HIGHER_IS_BETTER}


def task_loss_fn(task):
    return lookup(LOSSES, task.loss, f"loss of task '{task.name}'")


def task_metric_fns(task) -> dict:
    """{metric name: per-example fn or ``dense_metrics.Accumulated``} for a TaskSpec. 'loss' resolves
    to the task's loss: per example, or for a dense loss its pixel mean over the split."""
    loss = task_loss_fn(task)
    if task.loss in PIXEL_LOSS_SUMS:
        loss = dense_metrics.pixel_mean(PIXEL_LOSS_SUMS[task.loss])
    return {m: (lookup(METRICS, m, f"metric of task '{task.name}'") or loss) for m in task.metrics}
