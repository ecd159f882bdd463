"""Task specifications: what a task predicts, how it is scored, and which way is better."""

from __future__ import annotations

import dataclasses

TASK_KINDS = ("classification", "regression", "segmentation", "depth", "normal")
DENSE_KINDS = ("segmentation", "depth", "normal")

# kind -> (loss, metrics): LibMTL's NYUv2 / Cityscapes losses and metrics for the dense kinds
# (examples/nyu/utils.py: SegLoss / SegMetric, DepthLoss / DepthMetric, NormalLoss / NormalMetric).
_KIND_DEFAULTS = {
    "classification": ("cross_entropy", ("accuracy", "loss")),
    "regression": ("mse", ("mae", "mse")),
    "segmentation": ("pixel_cross_entropy", ("miou", "pixel_accuracy")),
    "depth": ("depth_l1", ("abs_err", "rel_err")),
    "normal": ("normal_cosine", ("angle_mean", "angle_median", "within_11_25", "within_22_5", "within_30")),
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task problem.

    Attributes:
      name: task name; also the key of its head (``params['heads'][name]``) and of its prediction.
      kind: 'classification' (integer labels [B], ``num_outputs`` classes; label -1 = example not
        labelled for the task), 'regression' (float targets of size ``num_outputs``), or a dense kind
        (predictions [B, H, W, num_outputs] at the input resolution): 'segmentation' (integer labels
        [B, H, W], -1 = ignored pixel, ``num_outputs`` classes), 'depth' ([B, H, W, 1], 0 = invalid
        pixel), 'normal' ([B, H, W, 3] unit vectors, invalid pixel = components summing to 0).
      num_outputs: classes for classification / segmentation, target size otherwise.
      label_key: key of the target in a batch (defaults to ``name``).
      loss: name in ``mtl_jax.train.losses.LOSSES`` (default by kind: 'cross_entropy', 'mse',
        'pixel_cross_entropy', 'depth_l1', 'normal_cosine').
      metrics: names in ``mtl_jax.train.losses.METRICS``; the first is the task's main metric.
      higher_is_better: one flag per metric.
      delta_m_metrics: the metrics Delta-m% averages over (``train.reporting.delta_m``); default: the
        main metric for classification / regression, every metric for the dense kinds (Nash-MTL's NYUv2
        Delta-m% averages all nine metrics of its three tasks).
    """

    name: str
    kind: str
    num_outputs: int
    label_key: str = ""
    loss: str = ""
    metrics: tuple[str, ...] = ()
    higher_is_better: tuple[bool, ...] = ()
    delta_m_metrics: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task '{self.name}': unknown kind '{self.kind}'; valid kinds: {TASK_KINDS}")
        loss, metrics = _KIND_DEFAULTS[self.kind]
        for field, value in {"label_key": self.name, "loss": loss, "metrics": metrics}.items():
            if not getattr(self, field):
                object.__setattr__(self, field, value)
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not self.higher_is_better:
            from mtl_jax.train.losses import HIGHER_IS_BETTER
            unknown = [m for m in self.metrics if m not in HIGHER_IS_BETTER]
            if unknown:
                raise ValueError(f"task '{self.name}': unknown metric(s) {unknown}; valid names: "
                                 f"{sorted(HIGHER_IS_BETTER)} (or pass higher_is_better)")
            object.__setattr__(self, "higher_is_better", tuple(HIGHER_IS_BETTER[m] for m in self.metrics))
        object.__setattr__(self, "higher_is_better", tuple(self.higher_is_better))
        if len(self.higher_is_better) != len(self.metrics):
            raise ValueError(f"task '{self.name}': {len(self.metrics)} metrics but "
                             f"{len(self.higher_is_better)} higher_is_better flags")
        if not self.delta_m_metrics:
            object.__setattr__(self, "delta_m_metrics", self.metrics if self.dense else self.metrics[:1])
        object.__setattr__(self, "delta_m_metrics", tuple(self.delta_m_metrics))
        unknown = [m for m in self.delta_m_metrics if m not in self.metrics]
        if unknown:
            raise ValueError(f"task '{self.name}': delta_m_metrics {unknown} are not among its metrics {self.metrics}")

    @property
    def dense(self) -> bool:
        """Whether the task predicts a map [B, H, W, num_outputs] (segmentation, depth, normal)."""
        return self.kind in DENSE_KINDS

    def better(self, metric: str) -> bool:
        """Whether a higher value of ``metric`` (one of ``metrics``) is better."""
        return self.higher_is_better[self.metrics.index(metric)]


def classification(name: str, num_classes: int, **kwargs) -> TaskSpec:
    return TaskSpec(name=name, kind="classification", num_outputs=num_classes, **kwargs)


def regression(name: str, num_outputs: int = 1, **kwargs) -> TaskSpec:
    return TaskSpec(name=name, kind="regression", num_outputs=num_outputs, **kwargs)


def binary(name: str, **kwargs) -> TaskSpec:
    """A binary attribute with one logit (a sigmoid head, FAMO's CelebA): labels 1 / 0 (-1 = not
    labelled), loss 'binary_cross_entropy', metrics F1 (accumulated true / false positives and false
    negatives over the split, FAMO's ``experiments/celeba/trainer.py``) and accuracy at logit 0."""
    kwargs = {"loss": "binary_cross_entropy", "metrics": ("f1", "binary_accuracy")} | kwargs
    return TaskSpec(name=name, kind="classification", num_outputs=1, **kwargs)


def segmentation(name: str, num_classes: int, **kwargs) -> TaskSpec:
    """Semantic segmentation: logits [B, H, W, num_classes], labels [B, H, W] (-1 ignored); LibMTL's
    loss (pixel cross-entropy) and metrics (mIoU, pixel accuracy)."""
    return TaskSpec(name=name, kind="segmentation", num_outputs=num_classes, **kwargs)


def depth(name: str, **kwargs) -> TaskSpec:
    """Depth: prediction [B, H, W, 1], target [B, H, W, 1] (0 invalid); LibMTL's L1 loss and absolute /
    relative errors over the valid pixels."""
    return TaskSpec(name=name, kind="depth", num_outputs=1, **kwargs)


def normal(name: str, **kwargs) -> TaskSpec:
    """Surface normals: prediction [B, H, W, 3], target [B, H, W, 3] unit vectors (all-zero invalid);
    LibMTL's 1 - cosine loss and angle metrics (mean, median, within 11.25 / 22.5 / 30 degrees)."""
    return TaskSpec(name=name, kind="normal", num_outputs=3, **kwargs)
