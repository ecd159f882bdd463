"""The pure train and eval steps.

One forward pass gives the per-task losses ``L [K]`` and a VJP closure. The MTL method turns
what it needs (``L`` alone, or the Gramian ``G = J J^T`` of the per-task shared gradients obtained
by a vmapped VJP) into task weights ``w [K]``; the shared parameters get ``sum_k w_k g_k``, every
head its own task's gradient, and each group is updated by its own optimiser. A step is applied only
when every loss, gradient and every floating leaf of the new state (parameters after the update,
optimiser, method and model state) is finite (:func:`guarded_leaves`).

Options: per-task gradients w.r.t. the shared representation instead of the shared parameters
(MGDA-UB), chunked Jacobians, SAM/ASAM on the method's objective and F-MTL task-based flat minima
(``flat_minima.py``).
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.moe_layers import AUX_LOSS
from mtl_jax.train import flat_minima, rep_mtl
from mtl_jax.train import layerwise as layerwise_gramian
from mtl_jax.train.layerwise import gramian
from mtl_jax.train.losses import task_loss_fn, task_metric_fns
from mtl_jax.train.methods import METHODS, MethodInputs, hyperparameters, returns_direction
from mtl_jax.train.optim import map_groups
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


def _task_metrics(task, pred, labels) -> tuple[dict, jax.Array]:
    """``({metric: per-example values [B]}, weight [B])``: weight 1 on the examples labelled for the
    task (``labelled``), 0 on the others (whose values are computed on a dummy label 0)."""
    mask = labelled(task, labels)
    weight = jnp.ones(labels.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    labels = labels if mask is None else jnp.where(mask, labels, 0)
    pred = jax.lax.stop_gradient(pred)
    return {metric: fn(pred, labels) for metric, fn in task_metric_fns(task).items()}, weight


def batch_metrics(tasks: Sequence, preds, batch) -> dict:
    """``{task: {metric: mean over the batch's examples labelled for the task}}`` (0 when none are)."""
    out = {}
    for t in tasks:
        values, weight = _task_metrics(t, preds[t.name], batch[t.label_key])
        out[t.name] = {m: (v * weight).sum() / jnp.maximum(weight.sum(), 1.0) for m, v in values.items()}
    return out


def metric_sums(tasks: Sequence, preds, batch, mask) -> tuple[dict, dict]:
    """``({task: {metric: sum}}, {task: count})`` over the examples that are real (``mask`` [B], 0 on
    padding) and labelled for the task: a split's mean is the sum of sums over the sum of counts."""
    sums, counts = {}, {}
    for t in tasks:
        values, weight = _task_metrics(t, preds[t.name], batch[t.label_key])
        weight = weight * mask
        sums[t.name] = {m: (v * weight).sum() for m, v in values.items()}
        counts[t.name] = weight.sum()
    return sums, counts


GRAMIAN_MODES = ("materialize", "vjp_jvp", "layerwise")


class GradientOptions(NamedTuple):
    """How the step gets per-task gradient information (from ``config.jacobian``).

    Attributes:
      chunk: tasks (or Gramian columns) per vmapped VJP; 0 = all K at once.
      gramian_mode: ``'materialize'``: per-task shared gradients ``J`` (leaves [K, ...]) by one
        vmapped VJP, then ``G = J J^T`` and ``J^T w``. ``'vjp_jvp'``: for methods that need only
        the Gramian, column l of G is ``J (J^T e_l)``, one VJP + one JVP (``gramian_by_jvp``),
        ``chunk`` columns at a time, so no more than chunk x P gradient entries are held; the
        shared update is then one VJP with ``w`` as cotangent. ``'layerwise'`` (default): for the
        same methods, ``G`` summed layer by layer from each shared Dense layer's inputs and
        per-task output cotangents (``layerwise.py``, ``<D_k, X X^T D_l>``; explicit rows only for
        the leaves no Dense call covers); the covered leaves' ``J^T w`` from the same pieces, the
        others by one weighted VJP. Methods that need ``J`` materialise it in every mode.
      last_shared: ``select(shared_tree) -> [leaves]`` of the last shared layer, for methods that
        want ``last_shared_gramian`` (GradNorm); None when no method needs it.
    """

    chunk: int = 0
    gramian_mode: str = "layerwise"
    last_shared: Callable | None = None


def _unflatten_like(flat, stacked_tree):
    """[P] vector -> a tree shaped like one row of ``stacked_tree`` (leaves [K, ...])."""
    leaves, treedef = jax.tree.flatten(stacked_tree)
    parts = jnp.split(flat, np.cumsum([x[0].size for x in leaves])[:-1].tolist())
    return jax.tree.unflatten(treedef, [p.reshape(x.shape[1:]) for p, x in zip(parts, leaves)])


def _combine(weights, stacked_tree):
    """sum_k weights[k] * tree_k for a tree whose leaves are stacked [K, ...]."""
    return jax.tree.map(lambda j: jnp.tensordot(weights.astype(j.dtype), j, axes=1), stacked_tree)


def map_cotangents(fn, cotangents, chunk: int = 0):
    """``fn`` over the leading axis of ``cotangents``: one vmap, or ``chunk`` at a time (``lax.map``)."""
    return jax.lax.map(fn, cotangents, batch_size=chunk) if chunk else jax.vmap(fn)(cotangents)


def per_task_jacobian(vjp_fn, num_tasks: int, dtype=jnp.float32, chunk: int = 0):
    """Per-task gradients from one vmapped VJP: leaves [K, ...] (a tuple if ``vjp_fn`` has several
    primals). ``chunk > 0`` evaluates ``chunk`` tasks at a time (``lax.map``) to bound memory.

    Row k of the head part is non-zero only for head k.
    """
    jac = map_cotangents(vjp_fn, jnp.eye(num_tasks, dtype=dtype), chunk)
    return jac[0] if len(jac) == 1 else jac


def linearize(fn, primal, has_aux: bool = False):
    """``(out, vjp_fn, jvp_fn[, aux])`` of ``fn`` at ``primal`` from one linearisation: the VJP is
    the transpose of the JVP (as in ``jax.vjp``), so one forward pass serves both."""
    out, jvp_fn, *aux = jax.linearize(fn, primal, has_aux=has_aux)
    return (out, jax.linear_transpose(jvp_fn, primal), jvp_fn, *aux)


def gramian_by_jvp(vjp_fn, jvp_fn, cotangents, chunk: int = 0) -> jax.Array:
    """Gramian columns without the Jacobian: row l of the result is ``jvp_fn(vjp_fn(c_l))``.

    With ``vjp_fn(c) = J^T c`` (a parameter tangent) and ``jvp_fn(t) = J t`` [K], the cotangents
    ``c_l = e_l`` ([C, K], C = K) give ``J J^T e_l``, column l of ``G``: one VJP + one JVP per
    column, ``chunk`` columns at a time (memory chunk x P, never K x P). Returns [C, K].
    """
    return map_cotangents(lambda c: jvp_fn(vjp_fn(c)), cotangents, chunk)


def params_gramian_by_jvp(vjp_fn, jvp_fn, params, num_tasks: int, dtype, chunk: int = 0) -> jax.Array:
    """[K, K] Gramian of the per-task *shared* gradients from the full-parameter ``vjp_fn`` /
    ``jvp_fn`` (``linearize`` of the losses): the tangent is ``J_shared^T e_l`` with zero heads."""
    zero_heads = jax.tree.map(jnp.zeros_like, params["heads"])
    to_tangent = lambda c: {"shared": vjp_fn(c)[0]["shared"], "heads": zero_heads}
    columns = gramian_by_jvp(to_tangent, jvp_fn, jnp.eye(num_tasks, dtype=dtype), chunk)
    return (0.5 * (columns + columns.T)).astype(jnp.float32)


def half_batches(batch: dict) -> dict:
    """Every leaf [B, ...] -> [B/2, 2, ...]: index 0 the even rows, 1 the odd rows of the batch (two
    disjoint halves; the split stays inside each device's shard of the batch axis)."""
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % 2:
        raise ValueError(f"double sampling (cross_gramian) splits the batch into two halves and needs one even "
                         f"batch size; got leading sizes {sorted(sizes)}")
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // 2, 2, *x.shape[1:]), batch)


def cross_gramian_of_halves(forward, params, model_state, batch, key, num_tasks: int, options: GradientOptions,
                            split=None, names: Sequence[str] = ()):
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
                                             with_jvp=by_jvp, layerwise=by_layer, chunk=options.chunk)
               for b in range(2)]
        if by_layer:  # <X_a^T D_a,k, X_b^T D_b,l> layer by layer
            return layerwise_gramian.layerwise_gramian(fns[0][3], fns[1][3])
        if by_jvp:  # row l: J_a (J_b^T e_l), one trunk VJP (half b) + one trunk JVP (half a)
            zero_heads = jax.tree.map(jnp.zeros_like, params["heads"])
            to_tangent = lambda c: {"shared": fns[1][1](c)[0]["shared"], "heads": zero_heads}
            return gramian_by_jvp(to_tangent, fns[0][3], jnp.eye(num_tasks, dtype=jnp.float32), options.chunk).T
        rows = [per_task_jacobian(lambda c, f=f: (f[1](c)[0]["shared"],), num_tasks, jnp.float32, options.chunk)
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


def leaf_selector(pattern: str) -> Callable:
    """``select(shared_tree) -> [leaves]``: the leaves whose path ``shared/<...>`` matches ``pattern``
    (``re.search``; works on stacked trees too). Raises ValueError listing the paths when none does."""

    def select(shared):
        flat = jax.tree_util.tree_flatten_with_path(shared)[0]
        paths = ["shared/" + key_path_str(path) for path, _ in flat]
        chosen = [leaf for path, (_, leaf) in zip(paths, flat) if re.search(pattern, path)]
        if not chosen:
            raise ValueError(f"config.jacobian.last_shared={pattern!r} matches no shared parameter; paths: {paths}")
        return chosen

    return select


def last_shared_layer(model, sample_input) -> str:
    """A regex for the last leaf group of ``params['shared']`` in creation order, i.e. the last
    layer the shared part applies (``^shared/dense_1/[^/]+$`` for a 2-layer MLP trunk,
    ``^shared/ln_final/[^/]+$`` for the ViT). Traced by ``jax.eval_shape`` (no computation): flax
    builds the params dict in creation order, which the sorted pytree order would lose.
    """
    seen = []

    def init():
        variables = model.init(jax.random.key(0), sample_input, train=False)
        seen.append(variables["params"]["shared"])
        return variables

    jax.eval_shape(init)
    node, path = seen[0], ["shared"]
    while isinstance(node, Mapping) and node:
        child = node[list(node)[-1]]
        if not isinstance(child, Mapping):
            break
        path.append(list(node)[-1])
        node = child
        if not any(isinstance(v, Mapping) for v in node.values()):
            break
    return "^" + re.escape("/".join(path)) + "/[^/]+$"


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


def head_weights(method, weights):
    """[K] scales of the heads' own gradients: ``w`` for loss-weighting methods, else ones (a method's
    direction or NaN weights touch only the shared part)."""
    return weights if method.weights_heads else jnp.ones_like(weights)


def head_gradients(method, weights, stacked_heads):
    """Head k gets its own row, scaled by ``w_k`` for loss-weighting methods."""
    return _combine(head_weights(method, weights), stacked_heads)


def weighted_vjp_gradients(method, weights, vjp_fn):
    """``{'shared': J^T w, 'heads': ...}`` from VJPs of the losses: one with ``w`` as cotangent (heads
    included for loss-weighting methods), plus one with ones for the heads of gradient methods
    (whose trunk half XLA drops as dead code)."""
    (grads,) = vjp_fn(weights)
    if not method.weights_heads:
        (unweighted,) = vjp_fn(jnp.ones_like(weights))
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
        grads = weighted_vjp_gradients(method, weights, vjp_fn)
        if layer_rows is not None and method.needs == "gramian":  # covered leaves from the rows G was made of
            grads = {**grads, "shared": layerwise_gramian.combine_rows(layer_rows, weights, grads["shared"])}
        return grads, weights, method_state
    # Per-task rows of the shared part only (XLA drops the unused per-task head cotangents); the
    # heads then need one more VJP, whose trunk half is dead code too.
    jac_shared = per_task_jacobian(lambda c: (vjp_fn(c)[0]["shared"],), num_tasks, dtype, options.chunk)
    shared, weights, method_state = aggregate(method, losses, jac_shared, method_state, step, key,
                                              options.last_shared, **fields)
    (head_grads,) = vjp_fn(head_weights(method, weights).astype(dtype))
    return {"shared": shared, "heads": head_grads["heads"]}, weights, method_state


def has_representation(model) -> bool:
    """Whether ``model`` has one shared representation (trunk + heads: ``HardParameterSharing``)."""
    return hasattr(model, "trunk") and hasattr(model, "heads")


def make_representation_forward(model, tasks: Sequence, input_key: str):
    """``(encode, decode)`` for representation-level gradients (LibMTL's ``rep_grad``, MGDA-UB).

    ``encode(shared_params, batch, key, train) -> z`` is the trunk; ``decode(head_params, z, batch,
    key, train, per_task=False) -> (losses [K], predictions)`` the heads (``per_task``: z is
    ``{task: z_t}``, head t reads its own copy). Both run the model's own ``stage``s, so with the
    same key their dropout masks are those of the whole model's forward. Needs a
    hard-parameter-sharing model (one shared representation) without mutable state.
    """
    if not has_representation(model):
        raise ValueError(f"representation-level gradients need a model with one shared representation (trunk + "
                         f"heads, e.g. 'hps'); got {type(model).__name__}")
    task_losses = make_task_losses(tasks)

    def encode(shared_params, batch, key, train):
        return model.apply({"params": {"shared": shared_params}}, batch[input_key], train, stage="trunk",
                           rngs={"dropout": key})

    def decode(head_params, z, batch, key, train, per_task=False):
        preds = model.apply({"params": {"heads": head_params}}, z, train, stage="heads", per_task=per_task,
                            rngs={"dropout": key})
        return task_losses(preds, batch), preds

    return encode, decode


def sows_aux_loss(model, params, batch, input_key: str) -> bool:
    """Whether the model's training forward sows auxiliary losses (traced by ``jax.eval_shape``)."""
    _, out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)},
                                                     mutable=[AUX_LOSS]), params, batch[input_key])
    return bool(jax.tree.leaves(out))


def heads_once(decode, head_params, z, batch, key, names: Sequence[str]):
    """``(losses [K], predictions, head_rows, Z)`` with every head differentiated once.

    Head t reads its own copy z_t of the representation ``z``, so one VJP with cotangent ones
    gives ``head_rows = {t: d L_t / d head_t}`` and ``Z_t = d L_t / dz`` stacked as ``Z``
    (leaves [K, ...z]); exact, since L_t depends on head t only. A vmapped VJP with one-hot
    cotangents would send each ``e_k`` back through all K heads (K^2 head backward passes).
    """
    copies = {t: z for t in names}
    losses, decode_vjp, preds = jax.vjp(lambda hp, zs: decode(hp, zs, batch, key, True, per_task=True),
                                        head_params, copies, has_aux=True)
    head_rows, z_rows = decode_vjp(jnp.ones_like(losses))
    stacked_z = jax.tree.map(lambda *rows: jnp.stack(rows), *[z_rows[t] for t in names])
    return losses, preds, head_rows, stacked_z


def scale_head_rows(head_rows, weights, names: Sequence[str]):
    """``{t: w_t d L_t / d head_t}``: the heads' part of ``J^T w`` from ``heads_once``'s rows."""
    return {t: jax.tree.map(lambda g, k=k: (weights[k] * g).astype(g.dtype), head_rows[t])
            for k, t in enumerate(names)}


def representation_losses_and_vjp(encode, decode, params, batch, key, names: Sequence[str], with_jvp: bool = False,
                                  layerwise: bool = False, chunk: int = 0):
    """``(losses [K], vjp_fn, predictions, jvp_fn)`` equal to ``jax.vjp`` (and ``jax.jvp``) of the
    whole training forward w.r.t. ``params``, with the heads differentiated once instead of once
    per task.

    A vmapped VJP of the whole forward sends each cotangent ``e_k`` back through all K heads (K^2
    head backward passes for a Jacobian). Here ``heads_once`` gives every head's own gradient
    ``d L_t / d head_t`` and ``Z_t = d L_t / dz`` [K, B, ...] from one VJP; then ``vjp_fn(c)`` is
    ``{'shared': trunk VJP of sum_t c_t Z_t, 'heads': {t: c_t d L_t / d head_t}}`` (exact: L_t
    depends on head t only), one trunk backward per cotangent. Memory: Z, K x the representation.

    ``with_jvp``: the trunk is linearised instead (one forward for both directions) and
    ``jvp_fn(tangent) [K] = <Z_t, J_z tangent['shared']> + <d L_t / d head_t, tangent['heads'][t]>``,
    one trunk JVP per tangent, no head pass: a Gramian column ``J (J^T e_l)``
    (``gramian_mode='vjp_jvp'``) is then one trunk VJP + one trunk JVP. ``layerwise``: the fourth
    value is instead the ``layerwise.LayerRows`` of the shared rows (the trunk's Dense inputs and
    the per-task cotangents ``Z_t`` sent back through the trunk, ``chunk`` tasks at a time), whose
    ``layerwise_gramian`` is G. Else the fourth value is None.
    """
    trunk = lambda p: encode(p, batch, key, True)
    if layerwise:
        z, encode_vjp, trunk_rows = layerwise_gramian.vjp_and_layerwise_gramian(trunk, params["shared"])
    elif with_jvp:
        z, encode_vjp, encode_jvp = linearize(trunk, params["shared"])
    else:
        z, encode_vjp = jax.vjp(trunk, params["shared"])
    losses, preds, head_rows, stacked_z = heads_once(decode, params["heads"], z, batch, key, names)

    def vjp_fn(cotangent):
        z_cotangent = jax.tree.map(lambda zs: jnp.tensordot(cotangent.astype(zs.dtype), zs, axes=1), stacked_z)
        (shared,) = encode_vjp(z_cotangent)
        return ({"shared": shared, "heads": scale_head_rows(head_rows, cotangent, names)},)

    def jvp_fn(tangent):
        dz = encode_jvp(tangent["shared"])
        through_trunk = sum(jnp.tensordot(zs, d, axes=d.ndim).astype(losses.dtype)
                            for zs, d in zip(jax.tree.leaves(stacked_z), jax.tree.leaves(dz)))
        through_heads = jnp.stack([sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(head_rows[t]),
                                                                       jax.tree.leaves(tangent["heads"][t])))
                                   for t in names]).astype(losses.dtype)
        return through_trunk + through_heads

    if layerwise:
        return losses, vjp_fn, preds, trunk_rows(stacked_z, chunk)
    return losses, vjp_fn, preds, (jvp_fn if with_jvp else None)


def representation_task_gradients(method, encode, decode, params, batch, key, method_state, step, method_key,
                                  names: Sequence[str]):
    """Gradients with the method applied to ``Z_k = dL_k/dz`` (MGDA-UB, Sener & Koltun 2018, Thm. 1;
    LibMTL's ``rep_grad``).

    One backward pass through the heads, each differentiated once (``heads_once``), gives ``Z``
    [K, B, ...]; the method's weights (or direction) form one cotangent for z, and one backward
    pass through the trunk gives the shared gradient. GradNorm (``wants`` the last shared layer's
    Gramian) gets ``Z Z^T``: its norms are those of the representation gradients, as in LibMTL
    with ``rep_grad=True``. Returns (grads, weights, method_state, losses, predictions).
    """
    enc_key, dec_key = jax.random.split(key)
    z, encode_vjp = jax.vjp(lambda p: encode(p, batch, enc_key, True), params["shared"])
    losses, preds, head_rows, stacked_z = heads_once(decode, params["heads"], z, batch, dec_key, names)
    z_cotangent, weights, method_state = aggregate(method, losses, stacked_z, method_state, step, method_key)
    (shared,) = encode_vjp(z_cotangent)
    return ({"shared": shared, "heads": scale_head_rows(head_rows, head_weights(method, weights), names)}, weights,
            method_state, losses, preds)


def flat_task_gradients(method, sharpness, losses_fn, params, losses, vjp_fn, method_state, step, key,
                        last_shared=None):
    """F-MTL (see flat_minima.py): shared ``A(g) + A(h)`` (or ``A(g~)`` for 'fmtl_a'), heads ``g~_k``.
    ``last_shared``: ``GradientOptions.last_shared`` (GradNorm's layer, read from the rows of J)."""
    jac = per_task_jacobian(vjp_fn, losses.shape[0], losses.dtype)
    task_eps = flat_minima.task_perturbations(jac, params, sharpness.rho, sharpness.adaptive, sharpness.eta)
    perturbed = flat_minima.perturbed_task_gradients(losses_fn, params, task_eps)
    key_g, key_h = jax.random.split(key)
    if sharpness.kind == "fmtl_a":
        shared, weights, new_state = aggregate(method, losses, perturbed["shared"], method_state, step, key_g,
                                               last_shared)
    else:
        shared, weights, new_state = aggregate(method, losses, jac["shared"], method_state, step, key_g, last_shared)
        flat = jax.tree.map(jnp.subtract, perturbed["shared"], jac["shared"])
        shared_flat, _, _ = aggregate(method, losses, flat, method_state, step, key_h, last_shared)
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


def gradient_options(jacobian, method, model=None, sample_input=None) -> GradientOptions:
    """``GradientOptions`` from ``config.jacobian`` (``chunk``, ``gramian_mode``, ``last_shared``;
    None = defaults) for ``method``: the last shared layer is resolved only when the method wants
    ``last_shared_gramian``, from ``jacobian.last_shared`` (a regex over ``shared/...`` paths) or, when
    that is '', ``last_shared_layer(model, sample_input)``."""
    get = (lambda name, default: jacobian.get(name, default)) if jacobian is not None else (lambda _, d: d)
    mode = get("gramian_mode", "layerwise")
    if mode not in GRAMIAN_MODES:
        raise ValueError(f"unknown jacobian.gramian_mode '{mode}'; valid: {list(GRAMIAN_MODES)}")
    last_shared = None
    if "last_shared_gramian" in method.wants:
        pattern = get("last_shared", "")
        if not pattern:
            if sample_input is None:
                raise ValueError(f"method '{method.name}' wants the last shared layer's Gramian: set "
                                 "config.jacobian.last_shared (a regex over 'shared/...' parameter paths) or pass "
                                 "sample_input to make_train_step to find the last layer")
            pattern = last_shared_layer(model, sample_input)
        last_shared = leaf_selector(pattern)
    return GradientOptions(chunk=int(get("chunk", 0)), gramian_mode=mode, last_shared=last_shared)


def make_train_step(model, tasks: Sequence, optimizers: dict, method, input_key: str, sharpness=None,
                    jacobian=None, rep_mtl_cfg=None, sample_input=None) -> Callable:
    """``train_step(state, batch) -> (state, metrics)``, pure; jit it with shardings (trainer.py).

    ``sharpness``: None, or a config with ``kind`` in flat_minima.KINDS ('' = plain step, 'sam',
    'fmtl', 'fmtl_a'), ``rho``, ``adaptive`` (ASAM's T = |w| + eta) and ``eta``.
    ``jacobian``: None, or a config with ``level`` ('params', or 'representation' for MGDA-UB-style
    gradients w.r.t. the shared representation), ``chunk`` (tasks per vmapped VJP; 0 = all),
    ``gramian_mode`` and ``last_shared`` (see ``GradientOptions`` / ``gradient_options``).
    ``rep_mtl_cfg``: None, or a config with ``tsr_weight``, ``csa_weight``, ``temperature``; either
    weight > 0 adds the Rep-MTL saliency regularisers (loss-weighting methods, HPS-like models).
    ``sample_input``: one input batch (shape only), to find the last shared layer by default.

    What the method asks for beyond ``needs``: ``after_update`` (FAMO) gets ``L_t(theta_{t+1})``
    from one extra forward on the same batch (same dropout key) after the update, on every path;
    ``wants=('cross_gramian',)`` (SDMGrad, MoDo) gets ``J_a J_b^T`` of the batch's two halves on the
    plain parameter-level step (not with sharpness steps, whose methods see the single-batch
    Gramian); ``wants=('last_shared_gramian',)`` (GradNorm) gets it on every parameter-level path.
    ``gramian_mode='vjp_jvp'`` applies to the plain and SAM steps (F-MTL and representation-level
    gradients hold per-task gradients by construction; methods that need J materialise it);
    ``'layerwise'`` (the default) serves the Gramian methods of those steps, the others ignore it.
    """
    level = jacobian.level if jacobian is not None else "params"
    options = gradient_options(jacobian, method, model, sample_input)
    chunk = options.chunk
    if level not in ("params", "representation"):
        raise ValueError(f"unknown jacobian level '{level}'; valid: ['params', 'representation']")
    # Loss weights that read no gradient are the same at either level; GradNorm reads norms.
    rep_level = level == "representation" and (method.needs != "losses" or "last_shared_gramian" in method.wants)
    use_rep_mtl = rep_mtl_cfg is not None and (rep_mtl_cfg.tsr_weight > 0 or rep_mtl_cfg.csa_weight > 0)
    if use_rep_mtl:
        if method.needs != "losses" or (sharpness is not None and sharpness.kind):
            raise ValueError("Rep-MTL regularisers combine with loss-weighting methods (e.g. 'ew') only, without "
                             f"sharpness steps; got method '{method.name}'")
        encode, decode = make_representation_forward(model, tasks, input_key)
    if rep_level:
        if sharpness is not None and sharpness.kind:
            raise ValueError("jacobian.level='representation' cannot be combined with sharpness steps")
        if method.name in METHODS and "num_params" in hyperparameters(method.name):
            raise ValueError(f"method '{method.name}' keeps per-parameter state across steps (rows of the shared "
                             "parameters' gradients); at jacobian.level='representation' its rows would be dL_k/dz of "
                             "each batch's own samples: use jacobian.level='params'")
        encode, decode = make_representation_forward(model, tasks, input_key)
    forward = make_forward(model, tasks, input_key)
    names = [t.name for t in tasks]
    kind = sharpness.kind if sharpness is not None else ""
    if kind not in flat_minima.KINDS:
        raise ValueError(f"unknown sharpness kind '{kind}'; valid: {list(flat_minima.KINDS)}")
    holds_rows = rep_level or kind in ("fmtl", "fmtl_a")  # per-task gradients by construction
    if options.gramian_mode == "vjp_jvp" and holds_rows:
        raise ValueError("jacobian.gramian_mode='vjp_jvp' applies to the parameter-level plain and SAM steps; F-MTL "
                         "and jacobian.level='representation' hold the per-task gradients by construction")
    by_jvp = options.gramian_mode == "vjp_jvp" and method.needs == "gramian"
    by_layer = (options.gramian_mode == "layerwise" and not holds_rows
                and (method.needs == "gramian" or "last_shared_gramian" in method.wants))
    double_sampling = "cross_gramian" in method.wants and kind == "" and not rep_level and not use_rep_mtl

    # The heads-once VJP pays off when per-task rows are formed (gradient methods, GradNorm's
    # last-layer rows, F-MTL's J); a loss-weighting step needs one weighted VJP, which the whole
    # forward's VJP gives without the [K, B, ...] stack of representation gradients.
    wants_rows = method.needs != "losses" or "last_shared_gramian" in method.wants or kind in ("fmtl", "fmtl_a")
    split_forward = (make_representation_forward(model, tasks, input_key)
                     if has_representation(model) and wants_rows else None)

    def representation_split(params, model_state, batch):
        """``(encode, decode)`` when the heads-once VJP applies: a trunk + heads model without mutable
        state or auxiliary losses; else None."""
        if split_forward is None or model_state or sows_aux_loss(model, params, batch, input_key):
            return None
        return split_forward

    def losses_and_vjp(params, model_state, batch, key, split):
        """``(losses, vjp_fn, jvp_fn or None, LayerRows or None, (predictions, model_state))`` of the
        training forward: a JVP too when the Gramian is built by JVPs, the layer-wise rows when it
        is built layer by layer; with ``split`` (``representation_split``), those of
        ``representation_losses_and_vjp`` (heads differentiated once)."""
        fn = lambda p: forward(p, model_state, batch, key, True)
        if split is not None:
            losses, vjp_fn, preds, extra = representation_losses_and_vjp(*split, params, batch, key, names, by_jvp,
                                                                         by_layer, chunk)
            return losses, vjp_fn, extra if by_jvp else None, extra if by_layer else None, (preds, model_state)
        if by_jvp:
            losses, vjp_fn, jvp_fn, aux = linearize(fn, params, has_aux=True)
            return losses, vjp_fn, jvp_fn, None, aux
        if by_layer:
            losses, vjp_fn, rows_fn, aux = layerwise_gramian.vjp_and_layerwise_gramian(
                fn, params, lambda p: p["shared"], has_aux=True)
            return losses, vjp_fn, None, rows_fn(jnp.eye(losses.shape[0], dtype=losses.dtype), chunk), aux
        losses, vjp_fn, aux = jax.vjp(fn, params, has_aux=True)
        return losses, vjp_fn, None, None, aux

    def apply_gradients(state, grads, weights, method_state, model_state, losses, preds, batch, key):
        """Per-group optimiser updates and the method's ``after_update`` (losses re-evaluated at the new
        parameters, same batch); the new state is kept only when every loss, gradient and floating
        leaf of it is finite (``guarded_leaves``), else the old state is (the step is counted skipped)."""
        task_finite = jnp.isfinite(losses) & jnp.stack([tree_all_finite(grads["heads"][n]) for n in names])

        def update(tx, g, s, p):
            updates, s = tx.update(g, s, p)
            return {"params": jax.tree.map(lambda a, u: (a + u).astype(a.dtype), p, updates), "opt": s}

        new = map_groups(update, optimizers, grads, state.opt_state, state.params)
        pick = lambda new_tree, old_tree: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_tree, old_tree)
        new_params = map_groups(lambda _, n: n["params"], optimizers, new)
        if method.after_update is not None:
            updated = jax.lax.stop_gradient(forward(new_params, model_state, batch, key, True)[0])
            after = method.after_update(MethodInputs(losses=losses, step=state.step, updated_losses=updated),
                                        method_state)
            method_state = jax.tree.map(lambda a, b: jnp.where(jnp.isfinite(updated).all(), a, b), after,
                                        method_state)
        metrics = batch_metrics(tasks, preds, batch)
        candidate = state.replace(params=new_params, opt_state=map_groups(lambda _, n: n["opt"], optimizers, new),
                                  model_state=model_state, method_state=method_state)
        state_finite = jnp.stack([jnp.isfinite(x).all() for _, x in guarded_leaves(candidate)])
        ok = task_finite.all() & tree_all_finite(grads["shared"]) & state_finite.all()
        new_state = state.replace(
            step=state.step + 1,
            params=pick(candidate.params, state.params),
            opt_state=pick(candidate.opt_state, state.opt_state),
            model_state=pick(model_state, state.model_state),
            method_state=pick(method_state, state.method_state),
            nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1),
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
            nonfinite_tasks=~task_finite,
            metric_sums=jax.tree.map(lambda s, m: s + jnp.where(ok, m, 0.0), state.metric_sums, metrics),
            metric_count=state.metric_count + ok.astype(jnp.int32),
        )
        return new_state, {"losses": losses, "weights": weights, "applied": ok, "nonfinite_tasks": ~task_finite,
                           "nonfinite_state": ~state_finite}

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        dropout_key, method_key = jax.random.split(key)
        if use_rep_mtl:
            grads, weights, method_state, losses, preds = rep_mtl_task_gradients(
                method, rep_mtl_cfg, encode, decode, state.params, batch, dropout_key, state.method_state, state.step,
                method_key)
            return apply_gradients(state, grads, weights, method_state, state.model_state, losses, preds, batch,
                                   dropout_key)
        if rep_level:
            grads, weights, method_state, losses, preds = representation_task_gradients(
                method, encode, decode, state.params, batch, dropout_key, state.method_state, state.step, method_key,
                names)
            return apply_gradients(state, grads, weights, method_state, state.model_state, losses, preds, batch,
                                   dropout_key)
        split = representation_split(state.params, state.model_state, batch)
        losses, vjp_fn, jvp_fn, layer_rows, (preds, model_state) = losses_and_vjp(state.params, state.model_state,
                                                                                  batch, dropout_key, split)
        losses_fn = lambda p: forward(p, state.model_state, batch, dropout_key, True)[0]
        if kind in ("fmtl", "fmtl_a"):
            grads, weights, method_state = flat_task_gradients(method, sharpness, losses_fn, state.params, losses,
                                                               vjp_fn, state.method_state, state.step, method_key,
                                                               options.last_shared)
        else:
            cross = (cross_gramian_of_halves(forward, state.params, state.model_state, batch, dropout_key,
                                             losses.shape[0], options, split, names) if double_sampling else None)
            grads, weights, method_state = task_gradients(method, losses, vjp_fn, state.method_state, state.step,
                                                          method_key, options, jvp_fn, state.params, cross, layer_rows)
        if kind == "sam":  # the same method's gradient, taken at w + eps
            eps = flat_minima.perturbation(grads, state.params, sharpness.rho, sharpness.adaptive, sharpness.eta)
            perturbed_params = flat_minima.add(state.params, eps)
            perturbed_losses, perturbed_vjp, perturbed_jvp, perturbed_rows, _ = losses_and_vjp(
                perturbed_params, state.model_state, batch, dropout_key, split)
            grads, weights, method_state = task_gradients(method, perturbed_losses, perturbed_vjp, state.method_state,
                                                          state.step, method_key, options, perturbed_jvp,
                                                          perturbed_params, layer_rows=perturbed_rows)
        return apply_gradients(state, grads, weights, method_state, model_state, losses, preds, batch, dropout_key)

    return train_step


def make_eval_step(model, tasks: Sequence, input_key: str) -> Callable:
    """``eval_step(params, model_state, batch) -> ({task: {metric: sum}}, {task: count})`` (:func:`metric_sums`)."""
    forward = make_forward(model, tasks, input_key)

    def eval_step(params, model_state, batch):
        _, (preds, _) = forward(params, model_state, batch, jax.random.key(0), False)
        return metric_sums(tasks, preds, batch, batch["mask"])

    return eval_step
