"""How a step forms per-task gradient information (``config.jacobian``): chunking, how the
Gramian is built, and the last shared layer GradNorm reads."""

from __future__ import annotations

import re
from typing import Callable, Mapping, NamedTuple

import jax

from mtl_jax.registry import lookup
from mtl_jax.train.sharding import key_path_str


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


def gradient_options(jacobian, method, model=None, sample_input=None) -> GradientOptions:
    """``GradientOptions`` from ``config.jacobian`` (``chunk``, ``gramian_mode``, ``last_shared``;
    None = defaults) for ``method``: the last shared layer is resolved only when the method wants
    ``last_shared_gramian``, from ``jacobian.last_shared`` (a regex over ``shared/...`` paths) or, when
    that is '', ``last_shared_layer(model, sample_input)``."""
    get = (lambda name, default: jacobian.get(name, default)) if jacobian is not None else (lambda _, d: d)
    mode = get("gramian_mode", "layerwise")
    lookup(GRAMIAN_MODES, mode, "jacobian.gramian_mode")
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

