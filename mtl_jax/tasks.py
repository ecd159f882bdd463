"""Task specifications: what a task predicts, how it is scored, and which way is better."""

from __future__ import annotations

import dataclasses

TASK_KINDS = ("classification", "regression")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task problem.

    Attributes:
      name: task name; also the key of its head (``params['heads'][name]``) and of its prediction.
      kind: 'classification' (integer labels, ``num_outputs`` classes) or 'regression'
        (float targets of size ``num_outputs``).
      num_outputs: classes for classification, target size for regression.
      label_key: key of the target in a batch (defaults to ``name``).
      loss: name in ``mtl_jax.train.losses.LOSSES`` ('cross_entropy', 'mse', 'l1').
      metrics: names in ``mtl_jax.train.losses.METRICS``; the first is the task's main metric (used
        by Delta-m%).
      higher_is_better: one flag per metric.
    """

    name: str
    kind: str
    num_outputs: int
    label_key: str = ""
    loss: str = ""
    metrics: tuple[str, ...] = ()
    higher_is_better: tuple[bool, ...] = ()

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task '{self.name}': unknown kind '{self.kind}'; valid kinds: {TASK_KINDS}")
        classification = self.kind == "classification"
        defaults = {
            "label_key": self.name,
            "loss": "cross_entropy" if classification else "mse",
            "metrics": ("accuracy", "loss") if classification else ("mae", "mse"),
        }
        for field, value in defaults.items():
            if not getattr(self, field):
                object.__setattr__(self, field, value)
        if not self.higher_is_better:
            from mtl_jax.train.losses import HIGHER_IS_BETTER
            object.__setattr__(self, "higher_is_better", tuple(HIGHER_IS_BETTER[m] for m in self.metrics))
        if len(self.higher_is_better) != len(self.metrics):
            raise ValueError(f"task '{self.name}': {len(self.metrics)} metrics but "
                             f"{len(self.higher_is_better)} higher_is_better flags")


def classification(name: str, num_classes: int, **kwargs) -> TaskSpec:
    return TaskSpec(name=name, kind="classification", num_outputs=num_classes, **kwargs)


def regression(name: str, num_outputs: int = 1, **kwargs) -> TaskSpec:
    return TaskSpec(name=name, kind="regression", num_outputs=num_outputs, **kwargs)
