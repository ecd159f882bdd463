"""Training and deploying a controllable (slimmable) multi-task network.

Aich et al. (ICCV 2023), "Efficient Controllable Multi-Task Architectures" (only the abstract was
available here; what it states is followed, the rest is written out below):

* **CIKD training**. Every step trains the full-width configuration on the task losses
  and several sub-width configurations (the sandwich rule of Yu & Huang 2019: the smallest one and
  ``num_random`` random ones, encoder and decoder widths drawn independently) on their task losses
  plus the configuration-invariant knowledge distillation loss, which pulls the student's
  encoder features towards the full-width model's (teacher, no gradient)::

      L = sum_k L_k(full) + sum_{c in sampled} [ sum_k L_k(c) + lambda * L_CIKD(c) ]
      L_CIKD(c) = mean (z_c - stop_grad(z_full)[..., :C_c])^2

  (z: encoder output [B, h, w, C]; a sub-width encoder keeps the first C_c channels, so it is
  compared with the teacher's first C_c channels.) The gradients of all configurations are summed
  and applied once. Each configuration's gradient is one jitted function of its (static) width
  configuration: it compiles once per configuration and never again (``CIKDTrainer.trace_counts``).
* **Budget search** (``search_widths``): a user's compute budget (FLOPs) and task
  preferences map to encoder and decoder widths. The paper's rule: the higher a task's
  preference, the larger its decoder's budget, while the encoder configuration is chosen for the
  best overall MTL performance.

Deviations, the paper's equations not being available here: the CIKD distance is the mean squared
error on the encoder output (the paper may use other layers or distances); the search enumerates
every configuration (|W|^(1+K) of them; fine for few tasks) and picks, among those within the
budget whose decoder widths follow the preference order (a more preferred task's decoder strictly
wider, as the abstract's "larger computational budget" says), the best preference-weighted
validation score when scores are given, else the widest encoder and then the widest
preference-weighted decoders.
"""

from __future__ import annotations

import collections
import functools
import operator
import types
from typing import Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.models.slimmable import SlimmableMTL, WidthConfig
from mtl_jax.train import trainer
from mtl_jax.train.forward import make_task_losses, metric_sums


def cikd_loss(student, teacher):
    """Configuration-invariant KD distance: mean over [B, ..., C_s] of (student - teacher[..., :C_s])^2;
    teacher [B, ..., C_full] gets no gradient."""
    teacher = jax.lax.stop_gradient(teacher)[..., : student.shape[-1]]
    return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def sample_width_configs(rng: np.random.Generator, model: SlimmableMTL, num_random: int) -> list[WidthConfig]:
    """The sandwich rule's students: the smallest configuration and ``num_random`` random ones
    (encoder and every decoder drawn independently and uniformly from ``model.widths``, redrawn
    when they hit the full width, which is the teacher)."""
    configs = [c for c in model.configurations() if c != model.full_width()]
    return [model.smallest()] + [configs[i] for i in rng.integers(len(configs), size=num_random)]


@flax.struct.dataclass
class SlimState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


class CIKDTrainer:
    """CIKD training of a ``SlimmableMTL`` (see the module docstring).

    ``init(key, sample_input) -> SlimState``; ``step(state, batch) -> (state, metrics)`` where
    ``metrics = {'losses': {config: [K]}, 'cikd': {config: float}}``. ``trace_counts[config]``
    counts how often the gradient of a configuration was traced (1 after its first step).
    """

    def __init__(self, model: SlimmableMTL, tasks: Sequence, optimizer: optax.GradientTransformation,
                 input_key: str = "image", kd_weight: float = 1.0, num_random: int = 1, seed: int = 0):
        self.model, self.optimizer, self.input_key = model, optimizer, input_key
        self.kd_weight, self.num_random = float(kd_weight), int(num_random)
        self.rng = np.random.default_rng(seed)
        self.trace_counts: collections.Counter = collections.Counter()
        self._task_losses = make_task_losses(tasks)
        self._grad = jax.jit(jax.grad(self._objective, has_aux=True), static_argnames="widths")
        self._apply = jax.jit(self._apply_updates, donate_argnums=0)

    def _objective(self, params, batch, teacher, widths: WidthConfig):
        """sum_k L_k(widths) (+ lambda L_CIKD against ``teacher`` unless it is None)."""
        self.trace_counts[widths] += 1  # Python side effect: runs only while tracing
        features, preds = self.model.apply({"params": params}, batch[self.input_key], train=True, widths=widths,
                                           method=SlimmableMTL.forward)
        losses = self._task_losses(preds, batch)
        kd = jnp.zeros(()) if teacher is None else cikd_loss(features, teacher)
        return losses.sum() + self.kd_weight * kd, {"losses": losses, "cikd": kd, "features": features}

    def _apply_updates(self, state: SlimState, grads):
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        return SlimState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)

    def init(self, key, sample_input) -> SlimState:
        params = jax.jit(self.model.init)(key, sample_input)["params"]
        return SlimState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

    def step(self, state: SlimState, batch: Mapping) -> tuple[SlimState, dict]:
        full = self.model.full_width()
        grads, aux = self._grad(state.params, batch, None, widths=full)
        metrics = {"losses": {full: aux["losses"]}, "cikd": {}}
        for config in sample_width_configs(self.rng, self.model, self.num_random):
            g, student = self._grad(state.params, batch, aux["features"], widths=config)
            grads = jax.tree.map(jnp.add, grads, g)
            metrics["losses"][config], metrics["cikd"][config] = student["losses"], student["cikd"]
        return self._apply(state, grads), metrics


def width_config_flops(model: SlimmableMTL, params, example, widths: WidthConfig, batch_size: int = 8) -> float:
    """XLA's FLOPs (cost analysis of the lowered inference forward; a multiply-add counts 2) per
    example at ``widths``; ``example``: one input without its batch axis (array or ShapeDtypeStruct)."""
    x = jax.ShapeDtypeStruct((batch_size,) + tuple(example.shape), example.dtype)
    forward = jax.jit(functools.partial(model.apply, train=False, widths=model.check(widths)))
    cost = forward.lower({"params": params}, x).cost_analysis()
    cost = cost if isinstance(cost, Mapping) else cost[0]
    return float(cost["flops"]) / batch_size


def respects_preferences(widths: WidthConfig, preferences: Mapping[str, float], strict: bool = False) -> bool:
    """Whether a more preferred task's decoder is wider (``strict``: p_i > p_j => w_i > w_j, the paper's
    "larger computational budget to the higher preferred task decoder") or at least as wide (w_i >= w_j)."""
    pairs = [(preferences[t], w) for t, w in widths.decoders]
    wider = operator.gt if strict else operator.ge
    return all(wider(wi, wj) for pi, wi in pairs for pj, wj in pairs if pi > pj)


def search_widths(budget: float, preferences: Mapping[str, float], costs: Mapping[WidthConfig, float],
                  scores: Mapping[WidthConfig, Mapping[str, float]] | None = None, strict: bool = True) -> WidthConfig:
    """Width configuration for a compute ``budget`` (same unit as ``costs``) and task ``preferences``
    ({task: weight >= 0}, normalised here) among ``costs``' configurations.

    Keeps the configurations within the budget whose decoder widths follow the preference order
    (``strict``, the default: a more preferred task's decoder is strictly wider, the paper's rule;
    if no such configuration fits, or with ``strict=False``, at least as wide; if none fits either,
    every configuration within the budget); picks the best preference-weighted score
    ``sum_k p_k scores[c][k]`` when ``scores`` (validation metrics, higher is better) are given, else
    the widest encoder, then the largest preference-weighted decoder width sum_k p_k w_k, then the
    lowest cost.
    """
    configs = list(costs)
    tasks = [t for t, _ in configs[0].decoders]
    if sorted(preferences) != sorted(tasks):
        raise ValueError(f"preferences name tasks {sorted(preferences)}; the configurations' tasks are {tasks}")
    p = np.array([float(preferences[t]) for t in tasks])
    if np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"preferences must be >= 0 with a positive sum; got {dict(preferences)}")
    p = dict(zip(tasks, p / p.sum()))
    cheapest = min(configs, key=lambda c: costs[c])
    if budget < costs[cheapest]:
        raise ValueError(f"budget {budget:.6g} is below the smallest configuration's cost {costs[cheapest]:.6g} "
                         f"({cheapest})")
    feasible = [c for c in configs if costs[c] <= budget]
    ordered = (strict and [c for c in feasible if respects_preferences(c, p, strict=True)]
               or [c for c in feasible if respects_preferences(c, p)] or feasible)
    decoder_width = lambda c: sum(p[t] * w for t, w in c.decoders)
    if scores is not None:
        return max(ordered, key=lambda c: (sum(p[t] * scores[c][t] for t in tasks), -costs[c]))
    return max(ordered, key=lambda c: (c.encoder, decoder_width(c), -costs[c]))


def make_config_evaluator(model: SlimmableMTL, tasks: Sequence, input_key: str = "image") -> Callable:
    """``evaluate(params, dataset, split, widths, batch_size) -> {task: {metric: mean}}`` over every
    example of ``dataset.splits[split]`` (``trainer.evaluate`` on one device); one jitted evaluation
    per configuration."""

    @functools.partial(jax.jit, static_argnames="widths")
    def sums(params, batch, widths):
        preds = model.apply({"params": params}, batch[input_key], train=False, widths=widths)
        return metric_sums(tasks, preds, batch, batch["mask"])

    def evaluate(params, dataset, split: str, widths: WidthConfig, batch_size: int = 1000) -> dict:
        eval_step = lambda p, _, batch: sums(p, batch, widths=model.check(widths))
        return trainer.evaluate(eval_step, types.SimpleNamespace(params=params, model_state={}), dataset, split,
                                batch_size, jax.sharding.SingleDeviceSharding(jax.devices()[0]))

    return evaluate
