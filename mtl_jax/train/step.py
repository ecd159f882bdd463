"""The pure train and eval steps.

One forward pass gives the per-task losses ``L [K]`` and a VJP closure. The MTL method turns
what it needs (``L`` alone, or the Gramian ``G = J J^T`` of the per-task shared gradients obtained
by a vmapped VJP) into task weights ``w [K]``; the shared parameters get ``sum_k w_k g_k``, every
head its own task's gradient, and each group is updated by its own optimiser. A step whose loss or
gradient is NaN/Inf is not applied.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.train.losses import task_loss_fn, task_metric_fns
from mtl_jax.train.methods import MethodInputs, returns_direction
from mtl_jax.train.optim import map_groups
from mtl_jax.train.state import TrainState


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_forward(model, tasks: Sequence, input_key: str) -> Callable:
    """``forward(params, model_state, batch, key, train) -> (losses [K], (predictions, model_state))``."""
    loss_fns = [(t.name, t.label_key, task_loss_fn(t)) for t in tasks]

    def forward(params, model_state, batch, key, train: bool):
        variables = {"params": params, **model_state}
        rngs = {"dropout": key}
        if train and model_state:
            preds, model_state = model.apply(variables, batch[input_key], train=True, rngs=rngs,
                                             mutable=list(model_state))
        else:
            preds = model.apply(variables, batch[input_key], train=train, rngs=rngs)
        losses = jnp.stack([fn(preds[name], batch[label]).mean() for name, label, fn in loss_fns])
        return losses, (preds, model_state)

    return forward


def batch_metrics(tasks: Sequence, preds, batch, mask=None) -> dict:
    """``{task: {metric: value}}``: batch means (``mask=None``) or masked sums over examples."""
    out = {}
    for t in tasks:
        out[t.name] = {}
        for metric, fn in task_metric_fns(t).items():
            values = fn(jax.lax.stop_gradient(preds[t.name]), batch[t.label_key])
            out[t.name][metric] = values.mean() if mask is None else (values * mask).sum()
    return out


def gramian(jacobian_tree) -> jax.Array:
    """G[k, l] = <g_k, g_l> summed over the leaves of a tree whose leaves are stacked [K, ...]."""
    return sum(jnp.einsum("k...,l...->kl", j, j, preferred_element_type=jnp.float32)
               for j in jax.tree.leaves(jacobian_tree))


def _unflatten_like(flat, stacked_tree):
    """[P] vector -> a tree shaped like one row of ``stacked_tree`` (leaves [K, ...])."""
    leaves, treedef = jax.tree.flatten(stacked_tree)
    parts = jnp.split(flat, np.cumsum([x[0].size for x in leaves])[:-1].tolist())
    return jax.tree.unflatten(treedef, [p.reshape(x.shape[1:]) for p, x in zip(parts, leaves)])


def _combine(weights, stacked_tree):
    """sum_k weights[k] * tree_k for a tree whose leaves are stacked [K, ...]."""
    return jax.tree.map(lambda j: jnp.tensordot(weights.astype(j.dtype), j, axes=1), stacked_tree)


def task_gradients(method, losses, vjp_fn, method_state, step, key):
    """Gradients of every parameter group under the method's weighting.

    Loss-based methods cost one VJP with the weights as cotangent. The others get the per-task
    gradients of all parameters from one vmapped VJP (``J``: leaves [K, ...]), the Gramian of its
    shared part, and (``needs='jacobian'``) its flattened shared rows; the shared gradient is
    ``sum_k w_k J_k`` (or the method's own direction), head k gets its row, scaled by ``w_k`` for
    loss-weighting methods.

    Returns (grads {'shared', 'heads'}, weights [K] (NaN when the method returns a direction),
    method_state).
    """
    num_tasks = losses.shape[0]
    if method.needs == "losses":
        weights, method_state = method.update(MethodInputs(losses=losses, step=step), method_state, key)
        weights = jax.lax.stop_gradient(weights).astype(losses.dtype)
        (grads,) = vjp_fn(weights)
        if not method.weights_heads:
            (unweighted,) = vjp_fn(jnp.ones_like(losses))
            grads = {"shared": grads["shared"], "heads": unweighted["heads"]}
        return grads, weights, method_state
    (jac,) = jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=losses.dtype))
    inputs = MethodInputs(losses=losses, step=step, gramian=gramian(jac["shared"]))
    if method.needs == "jacobian":
        inputs = inputs.replace(jacobian=jnp.concatenate(
            [j.reshape(num_tasks, -1) for j in jax.tree.leaves(jac["shared"])], axis=1))
    out, method_state = method.update(inputs, method_state, key)
    out = jax.lax.stop_gradient(out)
    if returns_direction(method):
        shared, weights = _unflatten_like(out, jac["shared"]), jnp.full((num_tasks,), jnp.nan)
    else:
        weights = out
        shared = _combine(weights, jac["shared"])
    head_weights = weights if method.weights_heads else jnp.ones_like(losses)
    return {"shared": shared, "heads": _combine(head_weights, jac["heads"])}, weights, method_state


def make_train_step(model, tasks: Sequence, optimizers: dict, method, input_key: str) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``, pure; jit it with shardings (trainer.py)."""
    forward = make_forward(model, tasks, input_key)
    names = [t.name for t in tasks]

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        dropout_key, method_key = jax.random.split(key)
        losses, vjp_fn, (preds, model_state) = jax.vjp(
            lambda p: forward(p, state.model_state, batch, dropout_key, True), state.params, has_aux=True)
        grads, weights, method_state = task_gradients(method, losses, vjp_fn, state.method_state, state.step,
                                                      method_key)
        task_finite = jnp.isfinite(losses) & jnp.stack([tree_all_finite(grads["heads"][n]) for n in names])
        ok = task_finite.all() & tree_all_finite(grads["shared"])

        def update(tx, g, s, p):
            updates, s = tx.update(g, s, p)
            return {"params": jax.tree.map(lambda a, u: (a + u).astype(a.dtype), p, updates), "opt": s}

        new = map_groups(update, optimizers, grads, state.opt_state, state.params)
        pick = lambda new_tree, old_tree: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_tree, old_tree)
        metrics = batch_metrics(tasks, preds, batch)
        new_state = state.replace(
            step=state.step + 1,
            params=pick(map_groups(lambda _, n: n["params"], optimizers, new), state.params),
            opt_state=pick(map_groups(lambda _, n: n["opt"], optimizers, new), state.opt_state),
            model_state=pick(model_state, state.model_state),
            method_state=pick(method_state, state.method_state),
            nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
            nonfinite_tasks=~task_finite,
            metric_sums=jax.tree.map(lambda s, m: s + jnp.where(ok, m, 0.0), state.metric_sums, metrics),
            metric_count=state.metric_count + ok.astype(jnp.int32),
        )
        return new_state, {"losses": losses, "weights": weights, "applied": ok, "nonfinite_tasks": ~task_finite}

    return train_step


def make_eval_step(model, tasks: Sequence, input_key: str) -> Callable:
    """``eval_step(params, model_state, batch) -> ({task: {metric: masked sum}}, example count)``."""
    forward = make_forward(model, tasks, input_key)

    def eval_step(params, model_state, batch):
        _, (preds, _) = forward(params, model_state, batch, jax.random.key(0), False)
        return batch_metrics(tasks, preds, batch, mask=batch["mask"]), batch["mask"].sum()

    return eval_step
