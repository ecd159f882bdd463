"""What every gradient strategy reads and returns.

A strategy is ``gradients(ctx: StepContext) -> TaskGradients``: from the parameters and a batch,
the per-task losses and the gradients of every parameter group under the MTL method's weights (or
direction). Wrappers (SAM) take a strategy and return one.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax


class StepContext(NamedTuple):
    """The inputs of one step's gradient computation.

    Attributes:
      params: ``{"shared": ..., "heads": {task: ...}}``.
      model_state: non-parameter collections (``batch_stats``), ``{}`` if none.
      batch: ``{input_key: [B, ...], label_key: [B, ...], ...}``.
      key: the forward's dropout key.
      method_state: the MTL method's state.
      step: int32 scalar, the optimisation step.
      method_key: the method's own PRNG key (RLW, GradDrop, ...).
    """

    params: Any
    model_state: Any
    batch: dict
    key: jax.Array
    method_state: Any
    step: jax.Array
    method_key: jax.Array


class TaskGradients(NamedTuple):
    """What a strategy returns.

    Attributes:
      grads: ``{"shared": ..., "heads": {task: ...}}``, the gradient each group's optimiser gets.
      weights: [K] the method's task weights (NaN for direction-returning methods).
      method_state: the method's new state.
      losses: [K] per-task losses at ``ctx.params`` (the reported losses; SAM keeps the unperturbed ones).
      predictions: ``{task: [B, ...]}`` of the same forward (for the running metrics).
      model_state: the forward's updated ``model_state`` (batch statistics).
    """

    grads: Any
    weights: jax.Array
    method_state: Any
    losses: jax.Array
    predictions: Any
    model_state: Any


class Linearization(NamedTuple):
    """The training forward at ``params`` and what per-task gradients are read from.

    Attributes:
      losses: [K] per-task losses.
      vjp_fn: ``vjp_fn(c [K]) -> (grads,)``: ``J^T c`` for every parameter.
      jvp_fn: ``jvp_fn(tangent) -> [K]`` (``gramian_mode='vjp_jvp'``), else None.
      layer_rows: ``layerwise.LayerRows`` of the shared rows (``gramian_mode='layerwise'``), else None.
      predictions: ``{task: [B, ...]}``.
      model_state: the forward's updated ``model_state``.
    """

    losses: jax.Array
    vjp_fn: Callable
    jvp_fn: Callable | None
    layer_rows: Any
    predictions: Any
    model_state: Any


Strategy = Callable[[StepContext], TaskGradients]
