"""The method applied to per-task gradient information: ``MethodInputs`` from stacked rows or
precomputed K x K fields, the method's weights (or direction), and the gradients of every
parameter group under them (shared: ``J^T w`` or the direction; head k: its own gradient, scaled
by ``w_k`` for loss-weighting methods)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.train.gradients import layerwise as layerwise_gramian
from mtl_jax.train.gradients.jacobian import params_gramian_by_jvp, per_task_jacobian
from mtl_jax.train.gradients.layerwise import gramian
from mtl_jax.train.gradients.options import GradientOptions
from mtl_jax.train.methods import MethodInputs, head_scales, returns_direction


def _unflatten_like(flat, stacked_tree):
    """[P] vector -> a tree shaped like one row of ``stacked_tree`` (leaves [K, ...])."""
    leaves, treedef = jax.tree.flatten(stacked_tree)
    parts = jnp.split(flat, np.cumsum([x[0].size for x in leaves])[:-1].tolist())
    return jax.tree.unflatten(treedef, [p.reshape(x.shape[1:]) for p, x in zip(parts, leaves)])


def _combine(weights, stacked_tree):
    """sum_k weights[k] * tree_k for a tree whose leaves are stacked [K, ...]."""
    return jax.tree.map(lambda j: jnp.tensordot(weights.astype(j.dtype), j, axes=1), stacked_tree)


def method_inputs(method, losses, step, stacked_shared=None, last_shared=None, **fields) -> MethodInputs:
    """``MethodInputs`` for ``method``: the losses, ``fields`` (precomputed K x K inputs), and from
    ``stacked_shared`` (per-task shared gradients, leaves [K, ...]) the Gramian / flattened
    Jacobian its ``needs`` ask for and, when wanted, the last shared layer's Gramian (the leaves
    ``last_shared`` selects; all of ``stacked_shared`` when it is None, e.g. representation rows)."""
    inputs = MethodInputs(losses=losses, step=step, **fields)
    if stacked_shared is None:
        return inputs
    if method.needs != "losses" and inputs.gramian is None:
        inputs = inputs.replace(gramian=gramian(stacked_shared))
    if method.needs == "jacobian":
        num_tasks = losses.shape[0]
        inputs = inputs.replace(jacobian=jnp.concatenate(
            [j.reshape(num_tasks, -1) for j in jax.tree.leaves(stacked_shared)], axis=1))
    if "last_shared_gramian" in method.wants and inputs.last_shared_gramian is None:
        rows = stacked_shared if last_shared is None else last_shared(stacked_shared)
        inputs = inputs.replace(last_shared_gramian=gramian(rows))
    return inputs


def aggregate(method, losses, stacked_shared, method_state, step, key, last_shared=None, **fields):
    """``A(g_1..g_K)``: the method's combination of stacked shared gradients (leaves [K, ...]).

    ``fields``: precomputed ``MethodInputs`` fields (e.g. ``cross_gramian``). Returns (shared
    gradient tree, weights [K] (NaN for direction-returning methods), state).
    """
    num_tasks = losses.shape[0]
    inputs = method_inputs(method, losses, step, stacked_shared, last_shared, **fields)
    out, method_state = method.update(inputs, method_state, key)
    out = jax.lax.stop_gradient(out)
    if returns_direction(method):
        return _unflatten_like(out, stacked_shared), jnp.full((num_tasks,), jnp.nan), method_state
    return _combine(out, stacked_shared), out, method_state


def head_weights(method, weights, method_state):
    """[K] scales of the heads' own gradients after ``weights, method_state = method.update(...)``
    (``methods.head_scales``): ``w`` for loss-weighting methods, ones for gradient methods (a
    method's direction or NaN weights touch only the shared part), ``w1`` for a ``chain``."""
    return head_scales(method, weights, method_state)


def head_gradients(method, weights, stacked_heads, method_state):
    """Head k gets its own row, scaled by ``head_weights``."""
    return _combine(head_weights(method, weights, method_state), stacked_heads)


def weighted_vjp_gradients(method, weights, vjp_fn, method_state):
    """``{'shared': J^T w, 'heads': ...}`` from VJPs of the losses: one with ``w`` as cotangent (heads
    included for loss-weighting methods), plus one with ``head_weights`` (ones, or a chain's ``w1``)
    for the heads of gradient methods (whose trunk half XLA drops as dead code)."""
    (grads,) = vjp_fn(weights)
    if not method.weights_heads or method.head_weights is not None:
        (unweighted,) = vjp_fn(head_weights(method, weights, method_state).astype(weights.dtype))
        grads = {"shared": grads["shared"], "heads": unweighted["heads"]}
    return grads


def task_gradients(method, losses, vjp_fn, method_state, step, key, options: GradientOptions = GradientOptions(),
                   jvp_fn=None, params=None, cross_gramian=None, layer_rows=None):
    """Gradients of every parameter group under the method's weighting.

    Methods that return weights from K x K information finish with ``weighted_vjp_gradients``:
    loss-based ones (plus, when wanted, the last shared layer's Gramian from a vmapped VJP of
    which XLA keeps only that layer's rows), those fed a precomputed ``cross_gramian``, and, with
    ``gramian_mode='vjp_jvp'`` (``jvp_fn`` and ``params`` given), Gramian methods whose ``G`` comes
    from ``params_gramian_by_jvp`` and, with ``gramian_mode='layerwise'``, those given the
    ``layer_rows`` (``layerwise.LayerRows``; their covered leaves' combination is then read from
    the rows, ``layerwise.combine_rows``). The others get the per-task gradients of the shared parameters
    from one vmapped VJP (``J``: leaves [K, ...]), its Gramian and (``needs='jacobian'``) its
    flattened rows; the shared gradient is ``sum_k w_k J_k`` (or the method's own direction); head
    k gets its own gradient, scaled by ``w_k`` for loss-weighting methods.

    Returns (grads {'shared', 'heads'}, weights [K] (NaN when the method returns a direction),
    method_state).
    """
    num_tasks, dtype = losses.shape[0], losses.dtype
    fields = {} if cross_gramian is None else {"cross_gramian": cross_gramian}
    by_jvp = method.needs == "gramian" and options.gramian_mode == "vjp_jvp" and jvp_fn is not None
    if method.needs == "gramian" and layer_rows is not None and cross_gramian is None:
        fields["gramian"] = layerwise_gramian.layerwise_gramian(layer_rows)
    if method.needs == "losses" or (method.needs == "gramian" and (by_jvp or "gramian" in fields
                                                                    or cross_gramian is not None)):
        if "last_shared_gramian" in method.wants and options.last_shared is not None:
            if layer_rows is not None:
                fields["last_shared_gramian"] = layerwise_gramian.layerwise_gramian(
                    layerwise_gramian.restrict(layer_rows, options.last_shared))
            else:
                rows = per_task_jacobian(lambda c: (options.last_shared(vjp_fn(c)[0]["shared"]),), num_tasks, dtype,
                                         options.chunk)
                fields["last_shared_gramian"] = gramian(rows)
        if by_jvp and cross_gramian is None:
            fields["gramian"] = params_gramian_by_jvp(vjp_fn, jvp_fn, params, num_tasks, dtype, options.chunk)
        weights, method_state = method.update(MethodInputs(losses=losses, step=step, **fields), method_state, key)
        weights = jax.lax.stop_gradient(weights).astype(dtype)
        grads = weighted_vjp_gradients(method, weights, vjp_fn, method_state)
        if layer_rows is not None and method.needs == "gramian":  # covered leaves from the rows G was made of
            grads = {**grads, "shared": layerwise_gramian.combine_rows(layer_rows, weights, grads["shared"])}
        return grads, weights, method_state
    # Per-task rows of the shared part only (XLA drops the unused per-task head cotangents); the
    # heads then need one more VJP, whose trunk half is dead code too.
    jac_shared = per_task_jacobian(lambda c: (vjp_fn(c)[0]["shared"],), num_tasks, dtype, options.chunk)
    shared, weights, method_state = aggregate(method, losses, jac_shared, method_state, step, key,
                                              options.last_shared, **fields)
    (head_grads,) = vjp_fn(head_weights(method, weights, method_state).astype(dtype))
    return {"shared": shared, "heads": head_grads["heads"]}, weights, method_state

