"""The pure train and eval steps.

One forward pass gives the per-task losses ``L [K]`` and a VJP closure. The MTL method turns
what it needs (``L`` alone, or the Gramian ``G = J J^T`` of the per-task shared gradients obtained
by a vmapped VJP) into task weights ``w [K]``; the shared parameters get ``sum_k w_k g_k``, every
head its own task's gradient, and each group is updated by its own optimiser. A step whose loss or
gradient is NaN/Inf is not applied.

Options: per-task gradients w.r.t. the shared representation instead of the shared parameters
(MGDA-UB), chunked Jacobians, SAM/ASAM on the method's objective and F-MTL task-based flat minima
(``flat_minima.py``).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.moe_layers import AUX_LOSS
from mtl_jax.train import flat_minima, rep_mtl
from mtl_jax.train.losses import task_loss_fn, task_metric_fns
from mtl_jax.train.methods import MethodInputs, returns_direction
from mtl_jax.train.optim import map_groups
from mtl_jax.train.state import TrainState


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def labelled(task, labels) -> jax.Array | None:
    """bool [B]: which examples are labelled for a classification task (label >= 0; a negative
    label marks an example of another task in heterogeneous data); None for other tasks (all)."""
    return labels >= 0 if task.kind == "classification" else None


def make_task_losses(tasks: Sequence) -> Callable:
    """``task_losses(predictions, batch) -> [K]``: each task's mean loss over its labelled examples
    (``labelled``; every example when all are labelled), in task order."""
    loss_fns = [(t, t.label_key, task_loss_fn(t)) for t in tasks]

    def task_loss(task, fn, pred, labels):
        mask = labelled(task, labels)
        if mask is None:
            return fn(pred, labels).mean()
        per_example = fn(pred, jnp.where(mask, labels, 0))
        return jnp.where(mask, per_example, 0.0).sum() / jnp.maximum(mask.sum(), 1).astype(per_example.dtype)

    return lambda preds, batch: jnp.stack([task_loss(t, fn, preds[t.name], batch[label]) for t, label, fn in loss_fns])


def task_mask(tasks: Sequence, batch) -> jax.Array:
    """float32 [B, K]: 1 where example b is labelled for task k (``labelled``)."""
    masks = [labelled(t, batch[t.label_key]) for t in tasks]
    size = batch[tasks[0].label_key].shape[0]
    return jnp.stack([jnp.ones((size,), bool) if m is None else m for m in masks], axis=1).astype(jnp.float32)


def aux_task_losses(aux, num_tasks: int):
    """[K]: the auxiliary losses a model sowed (``aux_loss`` collection, e.g. MoE load balancing):
    [K] leaves are per-task terms added to task k's loss, scalar leaves are split equally over the
    K tasks. So sum_k L_k holds every auxiliary loss once; a gradient method sees task k's share
    in its task gradient g_k (its own router's terms and 1/K of the shared ones)."""
    per_task = [a for a in jax.tree.leaves(aux) if a.ndim == 1]
    shared = [a for a in jax.tree.leaves(aux) if a.ndim == 0]
    return sum(per_task, jnp.zeros((num_tasks,), jnp.float32)) + sum(shared, jnp.zeros((), jnp.float32)) / num_tasks


def make_forward(model, tasks: Sequence, input_key: str) -> Callable:
    """``forward(params, model_state, batch, key, train) -> (losses [K], (predictions, model_state))``.

    In training, auxiliary losses the model sows into the ``aux_loss`` collection are added to
    the task losses (``aux_task_losses``). A model whose ``__call__`` takes ``task_mask`` gets
    ``task_mask(tasks, batch)`` (which examples are labelled for which task).
    """
    task_losses = make_task_losses(tasks)
    wants_mask = "task_mask" in inspect.signature(type(model).__call__).parameters

    def forward(params, model_state, batch, key, train: bool):
        variables = {"params": params, **model_state}
        rngs = {"dropout": key}
        kwargs = {"task_mask": task_mask(tasks, batch)} if wants_mask else {}
        aux = {}
        if train:
            preds, updated = model.apply(variables, batch[input_key], train=True, rngs=rngs,
                                         mutable=list(model_state) + [AUX_LOSS], **kwargs)
            updated = dict(updated)
            aux = updated.pop(AUX_LOSS, {})
            model_state = updated if model_state else model_state
        else:
            preds = model.apply(variables, batch[input_key], train=train, rngs=rngs, **kwargs)
        losses = task_losses(preds, batch)
        return (losses + aux_task_losses(aux, len(tasks)) if aux else losses), (preds, model_state)

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


def per_task_jacobian(vjp_fn, num_tasks: int, dtype=jnp.float32, chunk: int = 0):
    """Per-task gradients from one vmapped VJP: leaves [K, ...] (a tuple if ``vjp_fn`` has several
    primals). ``chunk > 0`` evaluates ``chunk`` tasks at a time (``lax.map``) to bound memory.

    Row k of the head part is non-zero only for head k.
    """
    eye = jnp.eye(num_tasks, dtype=dtype)
    jac = jax.lax.map(vjp_fn, eye, batch_size=chunk) if chunk else jax.vmap(vjp_fn)(eye)
    return jac[0] if len(jac) == 1 else jac


def aggregate(method, losses, stacked_shared, method_state, step, key):
    """``A(g_1..g_K)``: the method's combination of stacked shared gradients (leaves [K, ...]).

    Returns (shared gradient tree, weights [K] (NaN for direction-returning methods), state).
    """
    num_tasks = losses.shape[0]
    inputs = MethodInputs(losses=losses, step=step)
    if method.needs != "losses":
        inputs = inputs.replace(gramian=gramian(stacked_shared))
    if method.needs == "jacobian":
        inputs = inputs.replace(jacobian=jnp.concatenate(
            [j.reshape(num_tasks, -1) for j in jax.tree.leaves(stacked_shared)], axis=1))
    out, method_state = method.update(inputs, method_state, key)
    out = jax.lax.stop_gradient(out)
    if returns_direction(method):
        return _unflatten_like(out, stacked_shared), jnp.full((num_tasks,), jnp.nan), method_state
    return _combine(out, stacked_shared), out, method_state


def head_gradients(method, weights, stacked_heads):
    """Head k gets its own row, scaled by ``w_k`` for loss-weighting methods."""
    num_tasks = weights.shape[0]
    return _combine(weights if method.weights_heads else jnp.ones((num_tasks,)), stacked_heads)


def task_gradients(method, losses, vjp_fn, method_state, step, key, chunk: int = 0):
    """Gradients of every parameter group under the method's weighting.

    Loss-based methods cost one VJP with the weights as cotangent. The others get the per-task
    gradients of the shared parameters from one vmapped VJP (``J``: leaves [K, ...]), its Gramian
    and (``needs='jacobian'``) its flattened rows; the shared gradient is ``sum_k w_k J_k`` (or the
    method's own direction); head k gets its own gradient, scaled by ``w_k`` for loss-weighting
    methods.

    Returns (grads {'shared', 'heads'}, weights [K] (NaN when the method returns a direction),
    method_state).
    """
    if method.needs == "losses":
        weights, method_state = method.update(MethodInputs(losses=losses, step=step), method_state, key)
        weights = jax.lax.stop_gradient(weights).astype(losses.dtype)
        (grads,) = vjp_fn(weights)
        if not method.weights_heads:
            (unweighted,) = vjp_fn(jnp.ones_like(losses))
            grads = {"shared": grads["shared"], "heads": unweighted["heads"]}
        return grads, weights, method_state
    # Per-task rows of the shared part only (XLA drops the unused per-task head cotangents); the
    # heads then need one more VJP, whose trunk half is dead code too.
    jac_shared = per_task_jacobian(lambda c: (vjp_fn(c)[0]["shared"],), losses.shape[0], losses.dtype, chunk)
    shared, weights, method_state = aggregate(method, losses, jac_shared, method_state, step, key)
    head_weights = weights if method.weights_heads else jnp.ones_like(losses)
    (head_grads,) = vjp_fn(head_weights.astype(losses.dtype))
    return {"shared": shared, "heads": head_grads["heads"]}, weights, method_state


def make_representation_forward(model, tasks: Sequence, input_key: str):
    """``(encode, decode)`` for representation-level gradients (LibMTL's ``rep_grad``, MGDA-UB).

    ``encode(shared_params, batch, key, train) -> z`` is the trunk; ``decode(head_params, z, batch,
    key, train) -> (losses [K], predictions)`` the heads. Needs a hard-parameter-sharing model
    (one shared representation) without mutable state.
    """
    from mtl_jax.models.multitask import TaskHeads

    if not (hasattr(model, "trunk") and hasattr(model, "heads")):
        raise ValueError(f"representation-level gradients need a model with one shared representation (trunk + "
                         f"heads, e.g. 'hps'); got {type(model).__name__}")
    heads = TaskHeads(model.heads)
    task_losses = make_task_losses(tasks)

    def encode(shared_params, batch, key, train):
        return model.trunk.apply({"params": shared_params}, batch[input_key], train, rngs={"dropout": key})

    def decode(head_params, z, batch, key, train):
        preds = heads.apply({"params": head_params}, z, train, rngs={"dropout": key})
        return task_losses(preds, batch), preds

    return encode, decode


def representation_task_gradients(method, encode, decode, params, batch, key, method_state, step, method_key,
                                  chunk: int = 0):
    """Gradients with the method applied to ``Z_k = dL_k/dz`` (MGDA-UB, Sener & Koltun 2018, Thm. 1).

    K cheap backward passes through the heads give ``Z`` [K, B, ...]; the method's weights (or
    direction) form one cotangent for z, and one backward pass through the trunk gives the shared
    gradient. Returns (grads, weights, method_state, losses, predictions).
    """
    enc_key, dec_key = jax.random.split(key)
    z, encode_vjp = jax.vjp(lambda p: encode(p, batch, enc_key, True), params["shared"])
    losses, decode_vjp, preds = jax.vjp(lambda hp, zz: decode(hp, zz, batch, dec_key, True), params["heads"], z,
                                        has_aux=True)
    jac_heads, jac_z = per_task_jacobian(decode_vjp, losses.shape[0], losses.dtype, chunk)
    z_cotangent, weights, method_state = aggregate(method, losses, jac_z, method_state, step, method_key)
    (shared,) = encode_vjp(z_cotangent)
    grads = {"shared": shared, "heads": head_gradients(method, weights, jac_heads)}
    return grads, weights, method_state, losses, preds


def flat_task_gradients(method, sharpness, losses_fn, params, losses, vjp_fn, method_state, step, key):
    """F-MTL (see flat_minima.py): shared ``A(g) + A(h)`` (or ``A(g~)`` for 'fmtl_a'), heads ``g~_k``."""
    jac = per_task_jacobian(vjp_fn, losses.shape[0], losses.dtype)
    task_eps = flat_minima.task_perturbations(jac, params, sharpness.rho, sharpness.adaptive, sharpness.eta)
    perturbed = flat_minima.perturbed_task_gradients(losses_fn, params, task_eps)
    key_g, key_h = jax.random.split(key)
    if sharpness.kind == "fmtl_a":
        shared, weights, new_state = aggregate(method, losses, perturbed["shared"], method_state, step, key_g)
    else:
        shared, weights, new_state = aggregate(method, losses, jac["shared"], method_state, step, key_g)
        flat = jax.tree.map(jnp.subtract, perturbed["shared"], jac["shared"])
        shared_flat, _, _ = aggregate(method, losses, flat, method_state, step, key_h)
        shared = jax.tree.map(jnp.add, shared, shared_flat)
    return {"shared": shared, "heads": head_gradients(method, weights, perturbed["heads"])}, weights, new_state


def rep_mtl_task_gradients(method, rep_cfg, encode, decode, params, batch, key, method_state, step, method_key):
    """Rep-MTL (rep_mtl.py): gradients of ``sum_k w_k L_k + R(S)`` where ``S_k = dL_k/dz`` are the
    task saliencies and R the TSR + CSA regulariser (double backprop through S).

    One VJP of ``(losses, R)`` w.r.t. (head params, z) with cotangent ``(w, 1)`` and one through the
    trunk. Returns (grads, weights, method_state, losses, predictions).
    """
    enc_key, dec_key = jax.random.split(key)
    z, encode_vjp = jax.vjp(lambda p: encode(p, batch, enc_key, True), params["shared"])

    def objective(head_params, zz):
        reg, aux = rep_mtl.rep_mtl_loss(lambda z_: decode(head_params, z_, batch, dec_key, True), zz, has_aux=True,
                                        tsr_weight=rep_cfg.tsr_weight, csa_weight=rep_cfg.csa_weight,
                                        temperature=rep_cfg.temperature)
        return (aux["losses"], reg), aux["decode_aux"]

    (losses, _), objective_vjp, preds = jax.vjp(objective, params["heads"], z, has_aux=True)
    weights, method_state = method.update(MethodInputs(losses=losses, step=step), method_state, method_key)
    weights = jax.lax.stop_gradient(weights).astype(losses.dtype)
    head_grads, z_cotangent = objective_vjp((weights, jnp.ones((), losses.dtype)))
    (shared,) = encode_vjp(z_cotangent)
    return {"shared": shared, "heads": head_grads}, weights, method_state, losses, preds


def make_train_step(model, tasks: Sequence, optimizers: dict, method, input_key: str, sharpness=None,
                    jacobian=None, rep_mtl_cfg=None) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``, pure; jit it with shardings (trainer.py).

    ``sharpness``: None, or a config with ``kind`` in flat_minima.KINDS ('' = plain step, 'sam',
    'fmtl', 'fmtl_a'), ``rho``, ``adaptive`` (ASAM's T = |w| + eta) and ``eta``.
    ``jacobian``: None, or a config with ``level`` ('params', or 'representation' for MGDA-UB-style
    gradients w.r.t. the shared representation) and ``chunk`` (tasks per vmapped VJP; 0 = all).
    ``rep_mtl_cfg``: None, or a config with ``tsr_weight``, ``csa_weight``, ``temperature``; either
    weight > 0 adds the Rep-MTL saliency regularisers (loss-weighting methods, HPS-like models).
    """
    level = jacobian.level if jacobian is not None else "params"
    chunk = int(jacobian.chunk) if jacobian is not None else 0
    if level not in ("params", "representation"):
        raise ValueError(f"unknown jacobian level '{level}'; valid: ['params', 'representation']")
    rep_level = level == "representation" and method.needs != "losses"
    use_rep_mtl = rep_mtl_cfg is not None and (rep_mtl_cfg.tsr_weight > 0 or rep_mtl_cfg.csa_weight > 0)
    if use_rep_mtl:
        if method.needs != "losses" or (sharpness is not None and sharpness.kind):
            raise ValueError("Rep-MTL regularisers combine with loss-weighting methods (e.g. 'ew') only, without "
                             f"sharpness steps; got method '{method.name}'")
        encode, decode = make_representation_forward(model, tasks, input_key)
    if rep_level:
        if sharpness is not None and sharpness.kind:
            raise ValueError("jacobian.level='representation' cannot be combined with sharpness steps")
        encode, decode = make_representation_forward(model, tasks, input_key)
    forward = make_forward(model, tasks, input_key)
    names = [t.name for t in tasks]
    kind = sharpness.kind if sharpness is not None else ""
    if kind not in flat_minima.KINDS:
        raise ValueError(f"unknown sharpness kind '{kind}'; valid: {list(flat_minima.KINDS)}")

    def apply_gradients(state, grads, weights, method_state, model_state, losses, preds, batch):
        """Per-group optimiser updates, applied only when every loss and gradient is finite."""
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


    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        dropout_key, method_key = jax.random.split(key)
        if use_rep_mtl:
            grads, weights, method_state, losses, preds = rep_mtl_task_gradients(
                method, rep_mtl_cfg, encode, decode, state.params, batch, dropout_key, state.method_state, state.step,
                method_key)
            return apply_gradients(state, grads, weights, method_state, state.model_state, losses, preds, batch)
        if rep_level:
            grads, weights, method_state, losses, preds = representation_task_gradients(
                method, encode, decode, state.params, batch, dropout_key, state.method_state, state.step, method_key,
                chunk)
            return apply_gradients(state, grads, weights, method_state, state.model_state, losses, preds, batch)
        losses, vjp_fn, (preds, model_state) = jax.vjp(
            lambda p: forward(p, state.model_state, batch, dropout_key, True), state.params, has_aux=True)
        losses_fn = lambda p: forward(p, state.model_state, batch, dropout_key, True)[0]
        if kind in ("fmtl", "fmtl_a"):
            grads, weights, method_state = flat_task_gradients(method, sharpness, losses_fn, state.params, losses,
                                                               vjp_fn, state.method_state, state.step, method_key)
        else:
            grads, weights, method_state = task_gradients(method, losses, vjp_fn, state.method_state, state.step,
                                                          method_key, chunk)
        if kind == "sam":  # the same method's gradient, taken at w + eps
            eps = flat_minima.perturbation(grads, state.params, sharpness.rho, sharpness.adaptive, sharpness.eta)
            perturbed_losses, perturbed_vjp = jax.vjp(losses_fn, flat_minima.add(state.params, eps))
            grads, weights, method_state = task_gradients(method, perturbed_losses, perturbed_vjp, state.method_state,
                                                          state.step, method_key, chunk)
        return apply_gradients(state, grads, weights, method_state, model_state, losses, preds, batch)

    return train_step


def make_eval_step(model, tasks: Sequence, input_key: str) -> Callable:
    """``eval_step(params, model_state, batch) -> ({task: {metric: masked sum}}, example count)``."""
    forward = make_forward(model, tasks, input_key)

    def eval_step(params, model_state, batch):
        _, (preds, _) = forward(params, model_state, batch, jax.random.key(0), False)
        return batch_metrics(tasks, preds, batch, mask=batch["mask"]), batch["mask"].sum()

    return eval_step
