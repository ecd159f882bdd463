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


INPUT_GRAM, EXPLICIT_ROWS = "input_gram", "explicit_rows"
CONTRACTIONS = (INPUT_GRAM, EXPLICIT_ROWS)


def contraction_flops(rows: int, other_rows: int, in_dim: int, num: int, other_num: int, out_dim: int) -> dict:
    """Multiply-adds of ``<X^T D_k, Y^T E_l>`` for ``X`` [R, i], ``D`` [K, R, o], ``Y`` [R', i],
    ``E`` [K', R', o] by each route: ``input_gram`` (``X Y^T`` [R, R'], ``(X Y^T) E`` [R, K', o], then
    the K x K' contraction over R and o) and ``explicit_rows`` (``X^T D`` [i, K, o], ``Y^T E``, then the
    K x K' contraction over i and o)."""
    return {INPUT_GRAM: rows * other_rows * (in_dim + other_num * out_dim) + num * other_num * rows * out_dim,
            EXPLICIT_ROWS: (num * rows + other_num * other_rows) * in_dim * out_dim + num * other_num * in_dim * out_dim}


def choose_contraction(rows: int, other_rows: int, in_dim: int, num: int, other_num: int, out_dim: int) -> str:
    """The route of ``contraction_flops`` with fewer multiply-adds (``input_gram`` on a tie). On
    XLA:CPU both routes run as GEMMs of similar shape at a similar rate (measured by
    ``benchmarks/method_step_time.py --profile``, which times both on the benchmark's layers), so the
    FLOP count orders them."""
    flops = contraction_flops(rows, other_rows, in_dim, num, other_num, out_dim)
    return INPUT_GRAM if flops[INPUT_GRAM] <= flops[EXPLICIT_ROWS] else EXPLICIT_ROWS


def by_row(cotangents: jax.Array) -> jax.Array:
    """[K, R, o] -> [R, K, o] in fp32: the layout every contraction here reads, so that ``X^T D`` and
    ``(X Y^T) E`` are single GEMMs over ``[R, K * o]`` and the K x K' contraction a batched product
    over R. XLA fuses the transpose into the elementwise op that produced the cotangents."""
    return jnp.moveaxis(cotangents.astype(jnp.float32), 0, 1)


def weighted_rows(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_k w_k rows[:, k]`` [R, o] of ``rows`` [R, K, o] (``by_row``): a batched GEMV over R that
    reads the rows in their layout (as a plain ``tensordot`` over K, XLA copies them K-minor first)."""
    w = jnp.broadcast_to(weights.astype(rows.dtype), (rows.shape[0], 1, rows.shape[1]))
    return jax.lax.dot_general(w, rows, (((2,), (1,)), ((0,), (0,))))[:, 0]


def _times_rows(matrix: jax.Array, rows: jax.Array) -> jax.Array:
    """``matrix`` [N, R] times ``rows`` [R, K, o] -> [N, K, o]: one GEMM over ``rows`` viewed as [R, K * o].
    Every product here reads the rows as the same 3-d array, so XLA writes the row-major layout once
    (a 2-d view for one consumer and 3-d for another made it write the transposing fusion twice)."""
    return jax.lax.dot_general(matrix, rows, (((1,), (0,)), ((), ())))


def _row_products(left: jax.Array, right: jax.Array) -> jax.Array:
    """``sum_r left[r] right[r]^T`` [K, K'] of ``left`` [N, K, o] and ``right`` [N, K', o]: one batched
    GEMM over N (XLA:CPU fuses it with the GEMM that produced ``right``)."""
    return jax.lax.dot_general(left, right, (((2,), (2,)), ((0,), (0,)))).sum(axis=0)


def dense_gramian(inputs, cotangents, other_inputs=None, other_cotangents=None, route: str | None = None,
                  kernel: bool = True, bias: bool = False) -> jax.Array:
    """[K, K'] matrix of ``<X^T D_k, Y^T E_l>`` (eq. 1; ``Y = X``, ``E = D`` by default) for
    ``X`` [R, i], ``D`` [K, R, o], ``Y`` [R', i], ``E`` [K', R', o]: ``rows_gramian`` of the
    cotangents read row-major (``by_row``)."""
    e = None if other_cotangents is None else by_row(other_cotangents)
    return rows_gramian(inputs, by_row(cotangents), other_inputs, e, route, kernel, bias)


def rows_gramian(inputs, rows, other_inputs=None, other_rows=None, route: str | None = None, kernel: bool = True,
                 bias: bool = False) -> jax.Array:
    """[K, K'] matrix of ``<X^T D_k, Y^T E_l>`` in fp32 from row-major cotangents ``rows`` [R, K, o]
    (``D`` with its task axis second) and ``other_rows`` [R', K', o] (``E``; ``Y = X``, ``E = D`` by
    default), by ``route`` (``choose_contraction`` when None):

    * ``input_gram``: ``sum_r D[r] ((X Y^T) E)[r]^T``, i.e. ``(X Y^T) E`` as one GEMM over
      ``E`` viewed as [R', K' * o], then a batched product over R (XLA:CPU fuses both into one
      kernel with ``X Y^T``: no [R, K', o] intermediate is written);
    * ``explicit_rows``: ``sum_i (X^T D)[i] (Y^T E)[i]^T`` with ``X^T D`` one GEMM [i, K * o].

    No [K, R, o] array is transposed or copied: every product reads the rows in their layout.
    ``bias``: the bias rows ``1^T D_k`` are included as a column of ones appended to ``X`` and ``Y``
    (``X Y^T + 1``: no pass of their own over D); ``kernel=False``: the bias rows only.
    """
    symmetric = other_inputs is None and other_rows is None
    x = inputs.astype(jnp.float32)
    d = rows.astype(jnp.float32)
    y = x if other_inputs is None else other_inputs.astype(jnp.float32)
    e = d if other_rows is None else other_rows.astype(jnp.float32)
    (num_rows, num, out_dim), (other_num_rows, other_num, _) = d.shape, e.shape
    if not kernel:
        x, y = x[:, :0], y[:, :0]
    in_dim = x.shape[1] + bias
    route = route or choose_contraction(num_rows, other_num_rows, in_dim, num, other_num, out_dim)
    if route not in CONTRACTIONS:
        raise ValueError(f"unknown contraction route {route!r}; valid: {list(CONTRACTIONS)}")
    if route == INPUT_GRAM:
        gram = x @ y.T + (1.0 if bias else 0.0)  # [R, R']
        return _row_products(d, _times_rows(gram, e))
    if bias:
        x = jnp.concatenate([x, jnp.ones((num_rows, 1), x.dtype)], axis=1)
        y = jnp.concatenate([y, jnp.ones((other_num_rows, 1), y.dtype)], axis=1)
    left = _times_rows(x.T, d)  # [i, K, o]
    return _row_products(left, left if symmetric else _times_rows(y.T, e))


def layerwise_gramian(rows: LayerRows, other: LayerRows | None = None) -> jax.Array:
    """``G[k, l] = <g_k, h_l>`` summed over the shared leaves, from ``LayerRows`` of the g's and
    (cross Gramian) of the h's; ``other=None``: the symmetric Gramian of the g's."""
    symmetric = other is None
    other = rows if other is None else other
    total = gramian(rows.rest, other.rest)
    for (x, d, kernel, bias), (y, e, _, _) in zip(rows.dense, other.dense):
        if kernel is None and bias is None:
            continue
        parts = dict(kernel=kernel is not None, bias=bias is not None)
        total = total + (rows_gramian(x, d, **parts) if symmetric else rows_gramian(x, d, y, e, **parts))
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

        num = jax.tree.leaves(cotangents)[0].shape[0]
        if chunk:
            rest, tap_rows = jax.lax.map(rows, cotangents, batch_size=chunk)
            tap_rows = {key: jnp.moveaxis(t, 0, -2) for key, t in tap_rows.items()}
        else:  # the task axis next to the features: the taps' cotangents come out row-major, [..., K, o]
            axes = jax.tree.map(lambda c: 1 if c.ndim > 1 else 0, cotangents)
            moved = jax.tree.map(lambda c: jnp.moveaxis(c, 0, 1) if c.ndim > 1 else c, cotangents)
            rest, tap_rows = jax.vmap(rows, in_axes=(axes,), out_axes=(0, -2))(moved)
        dense = []
        for kernel in kernels:
            group = [(c, x) for c, x in zip(calls, inputs) if c.kernel == kernel]
            x = jnp.concatenate([xi.reshape(-1, xi.shape[-1]) for _, xi in group])
            d = jnp.concatenate([tap_rows[c.key].reshape(-1, num, tap_rows[c.key].shape[-1]) for c, _ in group])
            dense.append((x, d, kernel, group[0][0].bias))
        return LayerRows(rest, dense, uncovered, treedef)

    return (out, vjp_fn, rows_fn, aux) if has_aux else (out, vjp_fn, rows_fn)


def combine_rows(rows: LayerRows, weights: jax.Array, shared_gradient):
    """``sum_k w_k g_k`` from the rows the Gramian was made of: the covered leaves as ``X^T (sum_k
    w_k D_k)`` (bias ``1^T sum_k w_k D_k``), the uncovered ones as ``sum_k w_k`` of their explicit
    rows; ``shared_gradient`` (a tree like the result, e.g. a VJP with ``w`` as cotangent, of which
    XLA then computes nothing) gives the structure and dtypes. Returns a tree like it."""
    leaves, treedef = jax.tree.flatten(shared_gradient)
    leaves = list(leaves)
    w = weights.astype(jnp.float32)
    for row, index in zip(rows.rest, rows.rest_leaves):
        leaves[index] = jnp.tensordot(w.astype(row.dtype), row, axes=1).astype(leaves[index].dtype)
    for x, d, kernel, bias in rows.dense:
        weighted = weighted_rows(d.astype(jnp.float32), w)  # [R, o]
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
