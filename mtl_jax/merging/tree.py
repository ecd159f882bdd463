"""Pytree plumbing for model merging: paths, compatibility checks, leaf selection, layer index.

Every merging method in this package works on an arbitrary pytree of arrays (nested dicts of
linen params, a ``flax.nnx.State``, a flat ``{name: array}`` dict loaded from safetensors, lists,
...). Leaves are named by their '/'-joined key path, e.g. ``shared/Dense_0/kernel`` for
``{"shared": {"Dense_0": {"kernel": ...}}}`` and ``layers.3.mlp.weight`` for a flat dict key.

Task-stacked trees: several functions take a *stacked* tree, the same structure with every leaf
carrying an extra leading axis of size T (one slice per task), built by :func:`stack_trees`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Models = Sequence[Params] | Mapping[str, Params]  # fine-tuned models: a list, or {task name: params}
LayerIndexFn = Callable[[str], Optional[int]]

# A block index is a segment starting with one of these names, then `_`, `.` or `/`, then digits,
# then the end of the segment. Anchoring at a segment start keeps `MlpBlock_0` inside
# `encoderblock_3` from being read as block 0.
DEFAULT_LAYER_PATTERN = re.compile(
    r"(?:^|[/.])(?:encoderblock|decoderblock|block|blocks|layers|layer)[_./](\d+)(?=$|[/.])",
    re.IGNORECASE,
)


def path_to_str(keypath: Sequence[Any]) -> str:
    """'/'-joined name of a jax key path: ``(DictKey('a'), SequenceKey(0))`` -> ``'a/0'``.

    A final ``.value`` attribute (how a ``flax.nnx`` Variable flattens: ``nnx.State`` leaves sit
    at ``(..., DictKey('kernel'), GetAttrKey('value'))``) is dropped, so an ``nnx.State`` leaf has
    the same name as the linen leaf it corresponds to (``l1/kernel``).
    """
    keypath = tuple(keypath)
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keypath[-1].name == "value":
        keypath = keypath[:-1]
    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def flatten_with_paths(tree: Params) -> list[tuple[str, Any]]:
    """``[(path_str, leaf), ...]`` in ``jax.tree_util`` leaf order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_to_str(p), leaf) for p, leaf in leaves]


def model_list(pretrained: Params, finetuned: Models) -> list[Params]:
    """The fine-tuned models as a list: a list / tuple as given, a dict ``{task name: params}`` as its
    values in order. One tree with the pretrained structure is refused (a merge takes a collection)."""
    if isinstance(finetuned, Mapping):
        if jax.tree_util.tree_structure(finetuned) == jax.tree_util.tree_structure(pretrained):
            raise ValueError("finetuned is one model with the pretrained structure; pass a list of models or a dict "
                             "{task name: model}")
        return list(finetuned.values())
    return list(finetuned)


def leaf_paths(tree: Params) -> list[str]:
    """'/'-joined path of every leaf, in leaf order."""
    return [p for p, _ in flatten_with_paths(tree)]


def map_with_path(fn: Callable[..., Any], tree: Params, *rest: Params) -> Params:
    """``tree_map`` whose function also receives the leaf's '/'-joined path as first argument."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x, *r: fn(path_to_str(p), x, *r), tree, *rest
    )


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_compatible(
    reference: Params,
    others: Sequence[Params],
    *,
    reference_name: str = "pretrained",
    other_name: str = "finetuned",
    leading_dims: int = 0,
) -> None:
    """Raise ``ValueError`` unless every tree in ``others`` matches ``reference`` leaf by leaf.

    Args:
      reference: the tree defining structure and shapes (usually the pretrained params).
      others: trees that must have the same key paths and, per leaf, the same shape.
      reference_name: the name of ``reference`` in errors.
      other_name: the name of ``others`` in errors (``finetuned[2]``).
      leading_dims: number of extra leading axes allowed on the leaves of ``others`` (1 for
        task-stacked trees).

    The message names the first offending '/'-joined path and both shapes, e.g.
    ``shape mismatch at 'shared/Dense_0/kernel': pretrained (4, 3) vs finetuned[1] (4, 5)``.
    """
    ref_items = flatten_with_paths(reference)
    ref_def = jax.tree_util.tree_structure(reference)
    ref_paths = [p for p, _ in ref_items]
    for i, other in enumerate(others):
        name = f"{other_name}[{i}]"
        items = flatten_with_paths(other)
        paths = [p for p, _ in items]
        if paths != ref_paths or jax.tree_util.tree_structure(other) != ref_def:
            ref_set, set_ = set(ref_paths), set(paths)
            missing = [p for p in ref_paths if p not in set_]
            extra = [p for p in paths if p not in ref_set]
            if missing or extra:
                detail = f"missing {missing[:5]}, unexpected {extra[:5]}"
            else:
                detail = (
                    f"same leaf paths but different containers: {ref_def} vs "
                    f"{jax.tree_util.tree_structure(other)}"
                )
            raise ValueError(
                f"pytree structure mismatch between {reference_name} and {name}: {detail}"
            )
        for (path, ref_leaf), (_, leaf) in zip(ref_items, items):
            ref_shape, shape = _shape(ref_leaf), _shape(leaf)
            if shape[leading_dims:] != ref_shape or len(shape) != len(ref_shape) + leading_dims:
                raise ValueError(
                    f"shape mismatch at '{path}': {reference_name} {ref_shape} vs {name} {shape}"
                )


def stack_trees(trees: Sequence[Params], dtype: Any = None) -> Params:
    """Stack T same-structure trees into one tree whose leaves have a leading axis of size T.

    ``dtype`` (optional) casts every leaf first (e.g. ``jnp.float32`` to accumulate in fp32).
    """
    if len(trees) == 0:
        raise ValueError("need at least one tree to stack")
    check_compatible(trees[0], trees[1:], reference_name="trees[0]", other_name="trees")
    cast = (lambda x: jnp.asarray(x, dtype)) if dtype is not None else jnp.asarray
    return jax.tree_util.tree_map(lambda *xs: jnp.stack([cast(x) for x in xs]), *trees)


def unstack_tree(stacked: Params) -> list[Params]:
    """Inverse of :func:`stack_trees`: a list of T trees."""
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    num = leaves[0].shape[0]
    return [treedef.unflatten([x[t] for x in leaves]) for t in range(num)]


def replicate_if_explicit(x: jax.Array) -> jax.Array:
    """Replicate ``x`` if it carries explicitly sharded dimensions (``AxisType.Explicit`` meshes).

    Explicit-mode sharding rejects ambiguous ops (flattening a sharded axis, SVD of a sharded
    matrix, contracting sharded axes); the per-leaf reshapes/SVDs here then gather the one leaf,
    which is what GSPMD does implicitly for ``AxisType.Auto`` meshes. A no-op otherwise.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(s is None for s in spec):
        return x
    axis_types = getattr(sharding.mesh, "axis_types", ())
    if not any(t == jax.sharding.AxisType.Explicit for t in axis_types):
        return x
    return jax.sharding.reshard(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    )


def num_stacked(stacked: Params) -> int:
    """Size T of the leading (task) axis of a stacked tree."""
    return int(jax.tree_util.tree_leaves(stacked)[0].shape[0])


# ------------------------------------------------------------------------------------ selection


def _as_patterns(patterns: Optional[str | Iterable[str]]) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [re.compile(p) for p in patterns]


def path_selected(
    path: str, include: Optional[str | Iterable[str]] = None, exclude: Optional[str | Iterable[str]] = None
) -> bool:
    """Whether ``path`` is selected: it fully matches some ``include`` regex (all paths when
    ``include`` is None) and no ``exclude`` regex (``re.fullmatch`` semantics, as big_vision's
    regex tables)."""
    inc, exc = _as_patterns(include), _as_patterns(exclude)
    ok = True if not inc else any(p.fullmatch(path) for p in inc)
    return ok and not any(p.fullmatch(path) for p in exc)


def select_mask(
    tree: Params, include: Optional[str | Iterable[str]] = None, exclude: Optional[str | Iterable[str]] = None
) -> Params:
    """Tree of Python bools (same structure as ``tree``) marking the selected leaves."""
    return map_with_path(lambda p, _: path_selected(p, include, exclude), tree)


def select_flat(tree: Params, include=None, exclude=None) -> dict[str, Any]:
    """The selected leaves as a flat ``{path: leaf}`` dict (itself a pytree whose leaf paths are
    the original '/'-joined paths, so layer indices and regexes keep working on it)."""
    return {p: x for p, x in flatten_with_paths(tree) if path_selected(p, include, exclude)}


def replace_flat(tree: Params, flat: dict[str, Any]) -> Params:
    """Copy of ``tree`` with the leaves named in ``flat`` replaced (other leaves unchanged)."""
    return map_with_path(lambda p, x: flat.get(p, x), tree)


def merge_subset(
    merge_fn: Callable[..., Params],
    pretrained: Params,
    finetuned: Models,
    include: Optional[str | Iterable[str]] = None,
    exclude: Optional[str | Iterable[str]] = None,
    **hparams: Any,
) -> Params:
    """Run ``merge_fn`` on the selected leaves only; other leaves are taken from ``pretrained``.

    Global statistics of the method (TIES top-k threshold, LiNeS norms, ...) are computed over
    the selected leaves only. Example: ``merge_subset(ties_merging, p0, fts, include="shared/.*")``.
    """
    finetuned = model_list(pretrained, finetuned)
    check_compatible(pretrained, finetuned)
    sub0 = select_flat(pretrained, include, exclude)
    subs = [select_flat(f, include, exclude) for f in finetuned]
    merged = merge_fn(sub0, subs, **hparams)
    return replace_flat(pretrained, merged)


def merge_subset_per_task(
    merge_fn: Callable[..., Params],
    pretrained: Params,
    finetuned: Models,
    include: Optional[str | Iterable[str]] = None,
    exclude: Optional[str | Iterable[str]] = None,
    **hparams: Any,
) -> list[Params]:
    """Merge the selected leaves; return one model per task that keeps its own unselected leaves.

    E.g. ``merge_subset_per_task(task_arithmetic, p0, fts, include="shared/.*")`` gives, for
    every task t, the merged ``shared/...`` trunk with ``heads/...`` taken from ``finetuned[t]``.
    """
    finetuned = model_list(pretrained, finetuned)
    check_compatible(pretrained, finetuned)
    sub0 = select_flat(pretrained, include, exclude)
    subs = [select_flat(f, include, exclude) for f in finetuned]
    merged = merge_fn(sub0, subs, **hparams)
    return [replace_flat(f, merged) for f in finetuned]


# ---------------------------------------------------------------------------------- layer index


def default_layer_index(path: str) -> Optional[int]:
    """Block index of a leaf from its path, or None for leaves outside numbered blocks.

    Understands ``block_{i}``, ``Block_{i}``, ``blocks.{i}.``, ``layers.{i}.``, ``layers_{i}``,
    ``layer_{i}``, ``encoderblock_{i}`` (big_vision ViT) and list indices ``layers/{i}/``;
    the first numbered block segment in the path wins.
    """
    m = DEFAULT_LAYER_PATTERN.search(path)
    return int(m.group(1)) if m else None


def num_layers_of_paths(paths: Iterable[str], layer_index_fn: LayerIndexFn = default_layer_index) -> int:
    """Number of blocks L = 1 + max block index over the leaf paths (0 if no path has an index)."""
    idx = [i for i in map(layer_index_fn, paths) if i is not None]
    return max(idx) + 1 if idx else 0


def num_layers(tree: Params, layer_index_fn: LayerIndexFn = default_layer_index) -> int:
    """Number of blocks L = 1 + max block index over the leaves (0 if no leaf has an index)."""
    return num_layers_of_paths(leaf_paths(tree), layer_index_fn)
