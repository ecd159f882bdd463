"""The pure train and eval steps.

``train_step(state, batch)``: the forward and the per-task gradients from one gradient strategy
(``train/gradients``: parameter level, representation level, F-MTL, SAM around any of them,
Rep-MTL), the per-group optimiser updates (one optimiser for the shared parameters, one per task
head), the method's ``after_update`` (FAMO), the NaN guard and the running metrics. A step is applied
only when every loss, gradient and every floating leaf of the new state (parameters after the update,
optimiser, method and model state) is finite (:func:`guarded_leaves`); else the old state is kept
and the step counted as skipped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mtl_jax.train.forward import batch_metrics, make_forward, metric_sums
from mtl_jax.train.gradients import StepContext, make_gradients
from mtl_jax.train.methods import MethodInputs
from mtl_jax.train.optim import map_groups
from mtl_jax.train.precision import FLOAT32, Precision
from mtl_jax.train.sharding import key_path_str
from mtl_jax.train.state import TrainState


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def guarded_leaves(state) -> list[tuple[str, object]]:
    """``[(path, leaf)]`` of the floating leaves of a TrainState's ``params``, ``opt_state``,
    ``method_state`` and ``model_state``, in a fixed order: the leaves the step's NaN guard checks
    (``nonfinite_state`` in its outputs is a bool per entry) and the trainer names."""
    parts = {"params": state.params, "opt_state": state.opt_state, "method_state": state.method_state,
             "model_state": state.model_state}
    return [(key_path_str(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(parts)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]


def optimizer_update(optimizers: dict, grads, opt_state, params) -> tuple[dict, dict]:
    """``(new params, new optimiser state)``: each group (shared, every head) by its own optimiser."""

    def update(tx, g, s, p):
        updates, s = tx.update(g, s, p)
        return {"params": jax.tree.map(lambda a, u: (a + u).astype(a.dtype), p, updates), "opt": s}

    new = map_groups(update, optimizers, grads, opt_state, params)
    return map_groups(lambda _, n: n["params"], optimizers, new), map_groups(lambda _, n: n["opt"], optimizers, new)


def make_train_step(model, tasks: Sequence, optimizers: dict, method, input_key: str, sharpness=None,
                    jacobian=None, rep_mtl_cfg=None, sample_input=None, precision: Precision = FLOAT32,
                    micro_batches: int = 1) -> Callable:
    """``train_step(state, batch) -> (state, outputs)``, pure; jit it with shardings (trainer.py).

    ``sharpness``, ``jacobian``, ``rep_mtl_cfg`` (the config sections), ``sample_input``, ``precision``
    (``train/precision.py``) and ``micro_batches`` (gradient accumulation) choose the gradient strategy
    (``gradients.make_gradients``, which refuses invalid combinations). ``outputs``:
    ``losses`` [K], ``weights`` [K], ``applied`` (bool), ``nonfinite_tasks`` [K] (loss or head gradient
    non-finite), ``nonfinite_state`` (one bool per ``guarded_leaves`` entry of the candidate state).
    A method's ``after_update`` (FAMO) gets ``L_t(theta_{t+1})`` from one extra forward on the same
    batch (same dropout key); its state is kept only when those losses are finite.
    """
    gradients = make_gradients(model, tasks, method, input_key, sharpness, jacobian, rep_mtl_cfg, sample_input,
                               precision, micro_batches)
    forward = make_forward(model, tasks, input_key, precision)
    names = [t.name for t in tasks]

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        dropout_key, method_key = jax.random.split(key)
        out = gradients(StepContext(state.params, state.model_state, batch, dropout_key, state.method_state,
                                    state.step, method_key))
        params, opt_state = optimizer_update(optimizers, out.grads, state.opt_state, state.params)
        method_state = out.method_state
        if method.after_update is not None:
            updated = jax.lax.stop_gradient(forward(params, out.model_state, batch, dropout_key, True)[0])
            after = method.after_update(MethodInputs(losses=out.losses, step=state.step, updated_losses=updated),
                                        method_state)
            method_state = jax.tree.map(lambda a, b: jnp.where(jnp.isfinite(updated).all(), a, b), after,
                                        method_state)
        candidate = state.replace(params=params, opt_state=opt_state, model_state=out.model_state,
                                  method_state=method_state)

        task_finite = jnp.isfinite(out.losses) & jnp.stack([tree_all_finite(out.grads["heads"][n]) for n in names])
        state_finite = jnp.stack([jnp.isfinite(x).all() for _, x in guarded_leaves(candidate)])
        ok = task_finite.all() & tree_all_finite(out.grads["shared"]) & state_finite.all()
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        metrics = batch_metrics(tasks, out.predictions, batch)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(candidate.params, state.params),
            opt_state=keep(candidate.opt_state, state.opt_state),
            model_state=keep(candidate.model_state, state.model_state),
            method_state=keep(candidate.method_state, state.method_state),
            nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
            nonfinite_tasks=~task_finite,
            metric_sums=jax.tree.map(lambda s, m: s + jnp.where(ok, m, 0.0), state.metric_sums, metrics),
            metric_count=state.metric_count + ok.astype(jnp.int32),
        )
        return new_state, {"losses": out.losses, "weights": out.weights, "applied": ok,
                           "nonfinite_tasks": ~task_finite, "nonfinite_state": ~state_finite}

    return train_step


def make_eval_step(model, tasks: Sequence, input_key: str, precision: Precision = FLOAT32) -> Callable:
    """``eval_step(params, model_state, batch) -> ({task: {metric: sum}}, {task: count})`` (:func:`metric_sums`)."""
    forward = make_forward(model, tasks, input_key, precision)

    def eval_step(params, model_state, batch):
        _, (preds, _) = forward(params, model_state, batch, jax.random.key(0), False)
        return metric_sums(tasks, preds, batch, batch["mask"])

    return eval_step
