"""Accumulated metrics: a statistic summed over the evaluation set, turned into the metric once.

Most metrics are means of per-example values (``losses.METRICS``: ``fn(pred, target) -> [B]``). The
dense-prediction metrics are not: mIoU comes from a confusion matrix, the median angle from every
pixel's error. Such a metric is an :class:`Accumulated` pair:

  ``stats(pred [B, ...], target [B, ...], weight [B]) -> pytree of arrays``: a sum over the examples
  with weight 1 (weights are 0 / 1: padding and examples not labelled for the task are 0);
  ``finalize(summed pytree) -> scalar``: the metric, from the stats summed over every batch.

Evaluation sums ``stats`` over the batches and finalises once (``trainer.evaluate``); the running
training metrics finalise each batch's stats (``forward.batch_metrics``). A counted prediction with a
NaN / Inf makes a count-based metric NaN, as it makes a mean NaN. Counts are int32, so they
stay exact over a whole evaluation set (NYUv2's test set has 72M pixels). ``finalize`` is jnp code, run
in a trace (training) or on the host's summed arrays (evaluation).

The definitions are LibMTL's (``examples/nyu/utils.py``, median-research-group/LibMTL at 4336804,
the NYUv2 / Cityscapes example; the MTAN repository's ``im2im_pred/utils.py`` has the same formulas):

- segmentation: pixels with label in [0, C) count (-1 ignored); confusion matrix ``h[label, argmax]``;
  IoU_c = h_cc / (row_c + col_c - h_cc); mIoU = the mean IoU over the classes whose union is non-empty
  (LibMTL averages over every class and gives NaN when a class is neither in the labels nor predicted;
  the two agree whenever LibMTL's is a number); pixel accuracy = trace / sum.
- depth: valid pixels are those whose depth != 0; abs_err = sum |pred - depth| / #valid and rel_err =
  sum |pred - depth| / depth / #valid over every valid pixel of the split. LibMTL's ``DepthMetric``
  weights each batch's valid-pixel mean by ``pred.size()[0]`` after ``masked_select``, i.e. by the
  batch's number of valid pixels, which makes its score exactly this split-wide pixel mean,
  independent of the evaluation batch size. (The MTAN / Nash-MTL trainers instead average
  per-batch means with equal weight, which depends on the batch size.)
- normals: the prediction is L2-normalised; valid pixels are those whose target components do not sum
  to 0 (LibMTL's ``torch.sum(gt, dim=1) != 0``); the error is ``degrees(arccos(clip(<pred, gt>, -1,
  1)))``. angle_mean and the fractions below 11.25 / 22.5 / 30 degrees (strict ``<``) are exact counts
  over every valid pixel of the split (LibMTL concatenates them all). The median comes from a histogram
  of the angles in ``ANGLE_BIN_DEGREES`` bins over [0, 180]: it is the centre of the bin holding the
  median order statistic (the mean of the two middle ones for an even count, as ``np.median``), so it is
  within half a bin width (0.005 degrees) of the exact median.
- F1 (FAMO's CelebA, ``experiments/celeba/trainer.py``): prediction ``logit > 0`` (sigmoid > 0.5),
  precision = tp / (tp + fp + 1e-8), recall = tp / (tp + fn + 1e-8), F1 = 2 p r / (p + r + 1e-8).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

ANGLE_BIN_DEGREES = 0.01
ANGLE_BINS = 18000  # 180 / ANGLE_BIN_DEGREES
WITHIN_DEGREES = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}


@dataclasses.dataclass(frozen=True)
class Accumulated:
    """A metric finalised from statistics summed over a split.

    Attributes:
      stats: ``(pred [B, ...], target [B, ...], weight [B]) -> pytree`` summed over the examples of
        weight 1 (a pytree of arrays; ints for counts).
      finalize: ``summed pytree -> scalar`` (jnp; finite even when nothing was counted).
    """

    stats: Callable
    finalize: Callable


def _pixel_weight(weight, shape):
    """weight [B] broadcast to the pixels [B, H, W] (``shape``) as a bool: the example counts."""
    return jnp.broadcast_to((weight > 0).reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def _ratio(num, den):
    """num / den as float32, 0 where den == 0."""
    num, den = jnp.asarray(num, jnp.float32), jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# --- segmentation -------------------------------------------------------------------------------------

def _nonfinite(pred, counted):
    """int32: counted pixels (bool [B, H, W]) whose prediction [B, H, W, ...] has a NaN / Inf; a
    count-based metric is NaN when it is not 0 (as a mean over those pixels would be)."""
    bad = ~jnp.isfinite(pred.reshape(counted.shape + (-1,))).all(axis=-1)
    return (bad & counted).sum(dtype=jnp.int32)


def _nan_if(nonfinite, value):
    return jnp.where(jnp.asarray(nonfinite) > 0, jnp.nan, value)


def confusion_matrix(logits, labels, weight):
    """``{'h': int32 [C, C], 'nonfinite': int32}``: ``h[label, predicted class]`` over the pixels with
    label in [0, C) of the examples of weight 1; logits [B, H, W, C], labels [B, H, W]."""
    num_classes = logits.shape[-1]
    labels = labels.reshape(logits.shape[:-1]).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes) & _pixel_weight(weight, labels.shape)
    index = jnp.where(valid, labels, 0) * num_classes + jnp.argmax(logits, axis=-1).astype(jnp.int32)
    counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index.ravel()].add(valid.ravel().astype(jnp.int32))
    return {"h": counts.reshape(num_classes, num_classes), "nonfinite": _nonfinite(logits, valid)}


def miou(stats):
    """Mean IoU over the classes with a non-empty union (label or prediction); 0 when there is none."""
    return _nan_if(stats["nonfinite"], miou_from_confusion(stats["h"]))


def pixel_accuracy(stats):
    return _nan_if(stats["nonfinite"], pixel_accuracy_from_confusion(stats["h"]))


def miou_from_confusion(h):
    """Mean IoU of a confusion matrix [C, C] over the classes with a non-empty union; 0 without any."""
    h = jnp.asarray(h, jnp.float32)
    diag = jnp.diagonal(h)
    union = h.sum(axis=0) + h.sum(axis=1) - diag
    present = union > 0
    return _ratio(jnp.where(present, _ratio(diag, union), 0.0).sum(), present.sum())


def pixel_accuracy_from_confusion(h):
    h = jnp.asarray(h, jnp.float32)
    return _ratio(jnp.trace(h), h.sum())


# --- depth --------------------------------------------------------------------------------------------

def depth_error_sums(pred, depth, weight):
    """``{'abs', 'rel': float32 sums of |pred - depth| and |pred - depth| / depth, 'count': int32}``
    over the valid pixels (depth != 0) of the examples of weight 1; pred [B, H, W, 1], depth
    [B, H, W, 1] (or [B, H, W])."""
    pred = pred.astype(jnp.float32)
    depth = depth.reshape(pred.shape).astype(jnp.float32)
    valid = (depth != 0) & _pixel_weight(weight, pred.shape)
    err = jnp.where(valid, jnp.abs(pred - depth), 0.0)
    return {"abs": err.sum(), "rel": (err / jnp.where(valid, depth, 1.0)).sum(),
            "count": valid.sum(dtype=jnp.int32)}


# --- surface normals ----------------------------------------------------------------------------------

def normal_angles(pred, normal, weight):
    """``(angle [B, H, W] in degrees, valid bool [B, H, W])``: the angle between the L2-normalised
    prediction and the target; valid where the target's components do not sum to 0 (LibMTL) and the
    example's weight is 1. pred, normal [B, H, W, 3]."""
    pred = pred.astype(jnp.float32)
    normal = normal.reshape(pred.shape).astype(jnp.float32)
    pred = pred * jax.lax.rsqrt(jnp.maximum(jnp.square(pred).sum(axis=-1, keepdims=True), 1e-24))
    valid = (normal.sum(axis=-1) != 0) & _pixel_weight(weight, pred.shape[:-1])
    angle = jnp.degrees(jnp.arccos(jnp.clip((pred * normal).sum(axis=-1), -1.0, 1.0)))
    return jnp.where(valid, angle, 0.0), valid


def angle_sum(pred, normal, weight):
    angle, valid = normal_angles(pred, normal, weight)
    return {"sum": angle.sum(), "count": valid.sum(dtype=jnp.int32)}


def angle_histogram(pred, normal, weight):
    """``{'hist': int32 [ANGLE_BINS], 'nonfinite': int32}``: valid pixels per ``ANGLE_BIN_DEGREES`` bin
    of the angle over [0, 180]."""
    angle, valid = normal_angles(pred, normal, weight)
    index = jnp.clip(jnp.floor(jnp.nan_to_num(angle) / ANGLE_BIN_DEGREES).astype(jnp.int32), 0, ANGLE_BINS - 1)
    return {"hist": jnp.zeros((ANGLE_BINS,), jnp.int32).at[index.ravel()].add(valid.ravel().astype(jnp.int32)),
            "nonfinite": _nonfinite(pred, valid)}


def median_from_histogram(hist):
    """``np.median`` of the binned angles, each at its bin's centre (0 when the histogram is empty)."""
    hist = jnp.asarray(hist, jnp.int32)
    total = hist.sum()
    cumulative = jnp.cumsum(hist)
    order = lambda k: (jnp.searchsorted(cumulative, k, side="right") + 0.5) * ANGLE_BIN_DEGREES
    median = 0.5 * (order((total - 1) // 2) + order(total // 2))
    return jnp.where(total > 0, median, 0.0).astype(jnp.float32)


def within(degrees: float) -> Accumulated:
    """The fraction of valid pixels whose angle is below ``degrees`` (strict, as LibMTL)."""

    def stats(pred, normal, weight):
        angle, valid = normal_angles(pred, normal, weight)
        return {"below": (valid & (angle < degrees)).sum(dtype=jnp.int32), "count": valid.sum(dtype=jnp.int32),
                "nonfinite": _nonfinite(pred, valid)}

    return Accumulated(stats, lambda s: _nan_if(s["nonfinite"], _ratio(s["below"], s["count"])))


# --- binary attributes (F1) ---------------------------------------------------------------------------

def binary_counts(logits, labels, weight):
    """``{'tp', 'fp', 'fn': int32}`` of ``logit > 0`` against labels 1 / 0 over the examples of weight 1;
    logits [B, 1] or [B], labels [B]."""
    predicted = logits.reshape(logits.shape[0]) > 0
    positive = labels.reshape(labels.shape[0]) == 1
    counted = weight > 0
    count = lambda x: (x & counted).sum(dtype=jnp.int32)
    return {"tp": count(predicted & positive), "fp": count(predicted & ~positive), "fn": count(~predicted & positive),
            "nonfinite": count(~jnp.isfinite(logits.reshape(logits.shape[0])))}


def f1_from_counts(s):
    tp, fp, fn = (jnp.asarray(s[k], jnp.float32) for k in ("tp", "fp", "fn"))
    precision = tp / (tp + fp + 1e-8)
    recall = tp / (tp + fn + 1e-8)
    return _nan_if(s["nonfinite"], 2 * precision * recall / (precision + recall + 1e-8))


# --- the pixel mean of a dense loss -------------------------------------------------------------------

def pixel_mean(sums_fn: Callable) -> Accumulated:
    """The split-wide pixel mean of a dense loss given its ``sums_fn(pred, target) -> (sum [B], count
    [B])`` (``losses.PIXEL_LOSS_SUMS``): a task's 'loss' metric when its loss is a dense one."""

    def stats(pred, target, weight):
        total, count = sums_fn(pred, target)
        counted = weight > 0
        return {"sum": jnp.where(counted, total, 0.0).sum(), "count": jnp.where(counted, count, 0).sum(dtype=jnp.int32)}

    return Accumulated(stats, lambda s: _ratio(s["sum"], s["count"]))


ACCUMULATED = {
    "miou": Accumulated(confusion_matrix, miou),
    "pixel_accuracy": Accumulated(confusion_matrix, pixel_accuracy),
    "abs_err": Accumulated(depth_error_sums, lambda s: _ratio(s["abs"], s["count"])),
    "rel_err": Accumulated(depth_error_sums, lambda s: _ratio(s["rel"], s["count"])),
    "angle_mean": Accumulated(angle_sum, lambda s: _ratio(s["sum"], s["count"])),
    "angle_median": Accumulated(angle_histogram, lambda s: _nan_if(s["nonfinite"], median_from_histogram(s["hist"]))),
    **{name: within(degrees) for name, degrees in WITHIN_DEGREES.items()},
    "f1": Accumulated(binary_counts, f1_from_counts),
}
HIGHER_IS_BETTER = {"miou": True, "pixel_accuracy": True, "abs_err": False, "rel_err": False, "angle_mean": False,
                    "angle_median": False, "within_11_25": True, "within_22_5": True, "within_30": True, "f1": True}


def finalize_sums(metric_fn, summed, count) -> float:
    """A split's value of one metric from its summed eval-step output: ``finalize(stats)`` for an
    :class:`Accumulated` metric, the sum over ``count`` examples for a per-example one."""
    if isinstance(metric_fn, Accumulated):
        return float(jax.device_get(metric_fn.finalize(summed)))
    return float(summed) / float(count)
