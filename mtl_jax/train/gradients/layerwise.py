"""The Gramian of per-task shared gradients, layer by layer, without the Jacobian.

For a dense layer ``y = x W + b`` applied to rows ``X`` [R, i] (batch and any token axes
flattened), task k's gradient of ``W`` is ``X^T D_k`` with ``D_k = dL_k/dy`` [R, o], and of ``b``
it is ``1^T D_k``. Their Gramian needs no ``[K, i, o]`` stack of gradient rows:

    <X^T D_k, X^T D_l> = <D_k, (X X^T) D_l>                          (1)

(the "Gram trick" of per-example-gradient methods, e.g. Goodfellow 2015, and of TorchJD's
autogram engine: the Gramian accumulated layer by layer). One pass collects, for every
``flax.linen.Dense`` call whose kernel is a shared parameter, its input ``X`` and the cotangent of
its output for each task (the output gets an additive zero "tap" whose VJP is ``D_k``). Per layer
the cheaper of (1) and the explicit rows ``X^T D_k`` is taken (by FLOP count). Parameters no Dense
call covers (convolutions, norms, embeddings, and every Dense called inside a lifted transform such as
``nn.vmap`` / ``nn.scan`` / ``nn.remat``, detected by the current JAX trace) keep explicit rows from
the same vmapped VJP, of which XLA computes only those leaves.

Exact when every covered kernel (and bias) enters the forward only through ``nn.Dense`` calls; a
kernel used by several calls has their rows concatenated, ``sum_c X_c^T D_c = X^T D``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src import core as jax_core  # the current trace: no public accessor in jax 0.10


class DenseCall(NamedTuple):
    """One intercepted ``nn.Dense`` call: its tap's key and the shared leaves it reads."""

    key: str
    kernel: int  # index into jax.tree.leaves(shared)
    bias: int | None


def _dense_interceptor(shared_leaves, taps, calls: list, inputs: list):
    """A ``nn.intercept_methods`` interceptor adding ``taps[key]`` to each shared Dense output and
    recording the call (``calls``) and its input (``inputs``)."""
    index = {id(leaf): i for i, leaf in enumerate(shared_leaves)}
    outer_trace = jax_core.trace_ctx.trace

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if type(module) is not nn.Dense or context.method_name != "__call__" or len(args) != 1 or kwargs:
            return next_fun(*args, **kwargs)
        if jax_core.trace_ctx.trace is not outer_trace:  # inside a lifted transform (nn.vmap, nn.remat, ...)
            return next_fun(*args, **kwargs)
        params = module.variables.get("params", {})
        kernel, bias = params.get("kernel"), params.get("bias")
        if kernel is None or id(kernel) not in index:
            return next_fun(*args, **kwargs)
        call = DenseCall(f"{len(calls)}", index[id(kernel)], None if bias is None else index.get(id(bias)))
        if bias is not None and call.bias is None:  # a kernel we see with a bias we don't: not ours
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        calls.append(call)
        inputs.append(args[0])
        return out if taps is None else out + taps[call.key].astype(out.dtype)

    return intercept


def _tapped(fn, shared_of, taps, params):
    """``fn(params)`` with taps on the shared Dense outputs: (out, calls, inputs)."""
    calls, inputs = [], []
    with nn.intercept_methods(_dense_interceptor(jax.tree.leaves(shared_of(params)), taps, calls, inputs)):
        out = fn(params)
    return out, calls, inputs


class LayerRows(NamedTuple):
    """What a layer-wise Gramian reads, for K cotangents: ``rest``, explicit rows [K, ...] of the
    shared leaves no Dense call covers (leaf indices ``rest_leaves``); ``dense``, per covered kernel
    ``(X [R, i], D [K, R, o], kernel leaf index or None, bias leaf index or None)`` (None: that
    leaf's term left out, see ``restrict``); ``structure``: the shared tree's treedef."""

    rest: list
    dense: list
    rest_leaves: list
    structure: object


def gramian(jacobian_tree, other_tree=None) -> jax.Array:
    """G[k, l] = <a_k, b_l> summed over the leaves of trees whose leaves are stacked [K, ...]:
    the Gramian ``J J^T`` (``other_tree=None``) or the cross Gramian ``J_a J_b^T``."""
    other = jacobian_tree if other_tree is None else other_tree
    # One [K, n] x [n, K] matmul per leaf: XLA:CPU ran the same contraction as an einsum over the
    # trailing leaf dims 2.3x slower (K = 10, a 784-512-512 MLP's leaves).
    return sum(jnp.dot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1).T, preferred_element_type=jnp.float32)
               for a, b in zip(jax.tree.leaves(jacobian_tree), jax.tree.leaves(other)))


def dense_gramian(inputs, cotangents, other_inputs=None, other_cotangents=None) -> jax.Array:
    """[K, K'] matrix of ``<X^T D_k, Y^T E_l>`` (eq. 1; ``Y = X``, ``E = D`` by default) for
    ``X`` [R, i], ``D`` [K, R, o], ``Y`` [R', i], ``E`` [K', R', o], in fp32: through ``X Y^T`` when
    that takes fewer multiply-adds than the explicit rows ``X^T D_k``."""
    x = inputs.astype(jnp.float32)
    d = cotangents.astype(jnp.float32)
    y = x if other_inputs is None else other_inputs.astype(jnp.float32)
    e = d if other_cotangents is None else other_cotangents.astype(jnp.float32)
    (num, rows, out_dim), (other_num, other_rows, _) = d.shape, e.shape
    in_dim = x.shape[1]
    by_input_gram = rows * other_rows * (in_dim + other_num * out_dim) + num * other_num * rows * out_dim
    by_explicit_rows = (num + other_num) * rows * in_dim * out_dim + num * other_num * in_dim * out_dim
    if by_input_gram <= by_explicit_rows:
        ye = jnp.einsum("rs,kso->kro", x @ y.T, e)  # [K', R, o]
        return d.reshape(num, -1) @ ye.reshape(other_num, -1).T
    flat = lambda a, b: jnp.einsum("ri,kro->kio", a, b).reshape(b.shape[0], -1)
    return flat(x, d) @ flat(y, e).T


def layerwise_gramian(rows: LayerRows, other: LayerRows | None = None) -> jax.Array:
    """``G[k, l] = <g_k, h_l>`` summed over the shared leaves, from ``LayerRows`` of the g's and
    (cross Gramian) of the h's; ``other=None``: the symmetric Gramian of the g's."""
    other = rows if other is None else other
    total = gramian(rows.rest, other.rest)
    for (x, d, kernel, bias), (y, e, _, _) in zip(rows.dense, other.dense):
        if kernel is not None:
            total = total + dense_gramian(x, d, y, e)
        if bias is not None:
            total = total + d.sum(axis=1).astype(jnp.float32) @ e.sum(axis=1).astype(jnp.float32).T
    return total


def vjp_and_layerwise_gramian(fn: Callable, params, shared_of: Callable = lambda p: p, has_aux: bool = False,
                              prepare: Callable = lambda p: p):
    """``jax.vjp`` of ``fn`` plus the layer-wise pieces of per-task shared gradients.

    Args:
      fn: ``params -> out`` (``(out, aux)`` with ``has_aux``); its flax ``apply`` calls are
        intercepted, so the Dense layers reading leaves of ``shared_of(params)`` are found by identity.
      shared_of: the part of ``params`` whose per-task Gramian is wanted (e.g. ``p['shared']``).
      prepare: applied to ``params`` before ``fn`` inside the differentiated function (e.g. the cast
        to a mixed-precision compute dtype), so the Dense calls are found by the prepared leaves.

    Returns ``(out, vjp_fn, rows_fn[, aux])``: ``vjp_fn(c) = (params cotangent,)`` as ``jax.vjp``;
    ``rows_fn(cotangents [K, *out.shape], chunk=0) -> LayerRows`` of ``g_k``, the shared part of
    ``vjp_fn(cotangents[k])`` (one vmapped VJP, ``chunk`` at a time with ``chunk > 0``, of which
    XLA keeps the taps and the uncovered leaves). ``layerwise_gramian(rows_fn(c))`` is then
    ``[<g_k, g_l>]`` with no [K, i, o] rows for the Dense kernels that eq. (1) makes cheaper.
    """
    traced = []

    def abstract(p):  # one abstract trace finds the calls and their input shapes
        out, found, inputs = _tapped(fn, shared_of, None, prepare(p))
        traced.append(found)
        return out, inputs

    _, input_shapes = jax.eval_shape(abstract, params)
    calls = traced[0]
    leaves = jax.tree.leaves(shared_of(params))
    taps = {c.key: jnp.zeros(x.shape[:-1] + (leaves[c.kernel].shape[-1],), jnp.float32)
            for c, x in zip(calls, input_shapes)}

    def tapped(p, t):
        out, found, inputs = _tapped(fn, shared_of, t, prepare(p))
        if [c.key for c in found] != [c.key for c in calls]:
            raise RuntimeError("the shared Dense calls differ between the shape trace and the VJP trace")
        return (out, inputs) if not has_aux else (out[0], (out[1], inputs))

    out, vjp, extra = jax.vjp(tapped, params, taps, has_aux=True)
    aux, inputs = extra if has_aux else (None, extra)
    covered = {c.kernel for c in calls} | {c.bias for c in calls if c.bias is not None}
    kernels = sorted({c.kernel for c in calls})
    treedef = jax.tree.structure(shared_of(params))
    uncovered = [i for i in range(treedef.num_leaves) if i not in covered]

    def vjp_fn(cotangent):
        return (vjp(cotangent)[0],)

    def rows_fn(cotangents, chunk: int = 0) -> LayerRows:
        def rows(c):
            p_cot, tap_cot = vjp(c)
            return [g for i, g in enumerate(jax.tree.leaves(shared_of(p_cot))) if i not in covered], tap_cot

        rest, tap_rows = jax.lax.map(rows, cotangents, batch_size=chunk) if chunk else jax.vmap(rows)(cotangents)
        num = jax.tree.leaves(cotangents)[0].shape[0]
        dense = []
        for kernel in kernels:
            group = [(c, x) for c, x in zip(calls, inputs) if c.kernel == kernel]
            x = jnp.concatenate([xi.reshape(-1, xi.shape[-1]) for _, xi in group])
            d = jnp.concatenate([tap_rows[c.key].reshape(num, -1, tap_rows[c.key].shape[-1]) for c, _ in group],
                                axis=1)
            dense.append((x, d, kernel, group[0][0].bias))
        return LayerRows(rest, dense, uncovered, treedef)

    return (out, vjp_fn, rows_fn, aux) if has_aux else (out, vjp_fn, rows_fn)


def combine_rows(rows: LayerRows, weights: jax.Array, shared_gradient):
    """``sum_k w_k g_k`` on the covered leaves from the rows (``X^T (sum_k w_k D_k)``, bias
    ``1^T sum_k w_k D_k``), the other leaves taken from ``shared_gradient`` (the same combination
    by a VJP, of which XLA then keeps only the uncovered leaves). Returns a tree like it."""
    leaves, treedef = jax.tree.flatten(shared_gradient)
    leaves = list(leaves)
    for x, d, kernel, bias in rows.dense:
        weighted = jnp.tensordot(weights.astype(jnp.float32), d.astype(jnp.float32), axes=1)  # [R, o]
        if kernel is not None:
            grad = x.astype(jnp.float32).T @ weighted
            leaves[kernel] = grad.reshape(leaves[kernel].shape).astype(leaves[kernel].dtype)
        if bias is not None:
            leaves[bias] = weighted.sum(axis=0).reshape(leaves[bias].shape).astype(leaves[bias].dtype)
    return jax.tree.unflatten(treedef, leaves)


def restrict(rows: LayerRows, select: Callable) -> LayerRows:
    """The ``LayerRows`` of the leaves ``select(shared_tree) -> [leaves]`` picks (e.g. GradNorm's last
    shared layer): ``layerwise_gramian`` of the result is the Gramian of those leaves' rows only."""
    chosen = set(select(jax.tree.unflatten(rows.structure, list(range(rows.structure.num_leaves)))))
    rest = [(g, i) for g, i in zip(rows.rest, rows.rest_leaves) if i in chosen]
    dense = [(x, d, kernel if kernel in chosen else None, bias if bias in chosen else None)
             for x, d, kernel, bias in rows.dense if kernel in chosen or bias in chosen]
    return LayerRows([g for g, _ in rest], dense, [i for _, i in rest], rows.structure)
