"""The train state: everything a step reads and writes, as one pytree of arrays."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """
    Attributes:
      step: int32 scalar, steps taken (skipped non-finite steps included: it is the data position).
      params: ``{"shared": ..., "heads": {task: ...}}``.
      model_state: non-parameter variable collections (e.g. ``batch_stats``); ``{}`` if none.
      opt_state: ``{"shared": optax state, "heads": {task: optax state}}``, one optimiser per head.
      method_state: the MTL method's own state (loss weights, FAMO logits, ...).
      rng: uint32 key data (``jax.random.key_data``); the step's key is ``fold_in(rng, step)``.
      nonfinite_streak: int32, consecutive steps skipped because a loss or gradient was NaN/Inf.
      nonfinite_total: int32, all skipped steps.
      nonfinite_tasks: bool [K], the tasks whose loss or gradient was non-finite at the last step.
      metric_sums: ``{task: {metric: float32 sum of batch means}}`` over applied steps, and
        ``metric_count``: how many; the host turns differences of these into windowed averages.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    method_state: Any
    rng: jax.Array
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array
    nonfinite_tasks: jax.Array
    metric_sums: Any
    metric_count: jax.Array
