"""SDMGrad's / MoDo's double sampling: the cross Gramian ``J_a J_b^T`` of per-task shared
gradients on two disjoint halves of the batch."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.train.gradients import layerwise as layerwise_gramian
from mtl_jax.train.gradients.jacobian import gramian_by_jvp, linearize, map_cotangents, per_task_jacobian
from mtl_jax.train.gradients.layerwise import gramian
from mtl_jax.train.gradients.options import GradientOptions
from mtl_jax.train.gradients.representation import representation_losses_and_vjp
from mtl_jax.train.precision import FLOAT32, Precision


def half_batches(batch: dict) -> dict:
    """Every leaf [B, ...] -> [B/2, 2, ...]: index 0 the even rows, 1 the odd rows of the batch (two
    disjoint halves; the split stays inside each device's shard of the batch axis)."""
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % 2:
        raise ValueError(f"double sampling (cross_gramian) splits the batch into two halves and needs one even "
                         f"batch size; got leading sizes {sorted(sizes)}")
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // 2, 2, *x.shape[1:]), batch)


def cross_gramian_of_halves(forward, params, model_state, batch, key, num_tasks: int, options: GradientOptions,
                            split=None, names: Sequence[str] = (), precision: Precision = FLOAT32):
    """``J_a J_b^T`` [K, K]: per-task shared gradients on the even (a) and odd (b) halves of the
    batch (SDMGrad's / MoDo's double sampling), each half with its own dropout key.

    Both halves run in one vmapped forward (``losses [2, K]``); 'materialize' stacks the 2K
    half-batch gradients by one vmapped VJP, 'vjp_jvp' builds column l as ``J_a (J_b^T e_l)``,
    'layerwise' (trunk + heads models; others materialise) sums ``<D_a,k, X_a X_b^T D_b,l>`` per
    Dense layer.
    Mutable model state (batch statistics) of these passes is discarded. ``split``: ``(encode,
    decode)`` of ``make_representation_forward`` (with the task ``names``) on a trunk + heads
    model: each half by ``representation_losses_and_vjp`` (heads differentiated once; 'vjp_jvp'
    columns are a trunk VJP + a trunk JVP).
    """
    halves = half_batches(batch)
    keys = jax.random.split(key, 2)
    if split is not None:
        by_jvp, by_layer = options.gramian_mode == "vjp_jvp", options.gramian_mode == "layerwise"
        fns = [representation_losses_and_vjp(*split, params, jax.tree.map(lambda x: x[:, b], halves), keys[b], names,
                                             with_jvp=by_jvp, layerwise=by_layer, chunk=options.chunk,
                                             precision=precision)
               for b in range(2)]
        if by_layer:  # <X_a^T D_a,k, X_b^T D_b,l> layer by layer
            return layerwise_gramian.layerwise_gramian(fns[0].layer_rows, fns[1].layer_rows)
        if by_jvp:  # row l: J_a (J_b^T e_l), one trunk VJP (half b) + one trunk JVP (half a)
            zero_heads = jax.tree.map(jnp.zeros_like, params["heads"])
            to_tangent = lambda c: {"shared": fns[1].vjp_fn(c)[0]["shared"], "heads": zero_heads}
            return gramian_by_jvp(to_tangent, fns[0].jvp_fn, jnp.eye(num_tasks, dtype=jnp.float32), options.chunk).T
        rows = [per_task_jacobian(lambda c, f=f: (f.vjp_fn(c)[0]["shared"],), num_tasks, jnp.float32, options.chunk)
                for f in fns]
        return gramian(*rows)

    def half_losses(shared):
        both = {"shared": shared, "heads": params["heads"]}
        return jax.vmap(lambda b, k: forward(both, model_state, b, k, True)[0], in_axes=(1, 0))(halves, keys)

    dtype = jnp.float32
    if options.gramian_mode == "vjp_jvp":
        _, vjp_fn, jvp_fn = linearize(half_losses, params["shared"])
        on_b = jnp.stack([jnp.zeros((num_tasks, num_tasks), dtype), jnp.eye(num_tasks, dtype=dtype)], axis=1)
        columns = gramian_by_jvp(lambda c: vjp_fn(c)[0], lambda t: jvp_fn(t)[0], on_b, options.chunk)
        return columns.T  # row l held J_a J_b^T e_l
    _, vjp_fn = jax.vjp(half_losses, params["shared"])
    basis = jnp.eye(2 * num_tasks, dtype=dtype).reshape(2 * num_tasks, 2, num_tasks)
    (jac,) = map_cotangents(vjp_fn, basis, options.chunk)
    return gramian(jax.tree.map(lambda j: j[:num_tasks], jac), jax.tree.map(lambda j: j[num_tasks:], jac))

