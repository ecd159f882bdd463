"""Name and layout mapping between a flat checkpoint (``{name: array}``, e.g. a PyTorch state dict)
and a Flax linen parameter tree.

A :class:`Rename` says where one checkpoint tensor goes in the tree and how its layout changes
(a :class:`Transform`: a pair of numpy functions, checkpoint -> tree and back). :func:`load_into`
fills a template tree from a checkpoint, checking every name and shape first (one
:class:`CheckpointMismatchError` listing all problems, nothing loaded); :func:`export` inverts it,
so ``export(load_into(template, state, renames), renames)`` equals ``state`` bit for bit (when the
template's dtypes are the checkpoint's and no name is ignored).

Layouts (PyTorch -> Flax):

* :data:`LINEAR`: ``nn.Linear`` weight ``[out, in]`` -> ``nn.Dense`` kernel ``[in, out]``;
* :data:`CONV2D`: ``nn.Conv2d`` weight ``[O, I, kh, kw]`` (OIHW) -> ``nn.Conv`` kernel
  ``[kh, kw, I, O]`` (HWIO);
* :data:`DEPTHWISE_CONV2D`: depthwise ``nn.Conv2d(groups=C)`` weight ``[C, 1, kh, kw]`` -> ``nn.Conv(
  feature_group_count=C)`` kernel ``[kh, kw, 1, C]``;
* :data:`IDENTITY`: biases, norms, embeddings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from mtl_jax.errors import UsageError

_SHOWN = 5  # names listed per kind of problem in a CheckpointMismatchError


class CheckpointMismatchError(UsageError):
    """A checkpoint that does not fit the model: the message lists the missing, unexpected and
    mis-shaped names (first few of each, with counts); the full lists are attributes."""

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mis_shaped: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mis_shaped = list(mis_shaped)


class Transform(NamedTuple):
    """A layout change: ``forward`` maps a checkpoint array to the model's layout, ``inverse`` maps
    it back (``inverse(forward(x)) == x`` exactly)."""
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


def _transpose(axes: tuple[int, ...], what: str, check: Optional[Callable[[tuple], bool]] = None):
    """A numpy function transposing a ``len(axes)``-d array by ``axes``; refuses other ranks."""
    def fn(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != len(axes) or (check is not None and not check(x.shape)):
            raise ValueError(f"expected {what}, got shape {tuple(x.shape)}")
        return np.ascontiguousarray(np.transpose(x, axes))
    return fn


def _identity(x: np.ndarray) -> np.ndarray:
    return np.asarray(x)


IDENTITY = Transform(_identity, _identity)
LINEAR = Transform(_transpose((1, 0), "a 2-d [out, in] weight"), _transpose((1, 0), "a 2-d [in, out] kernel"))
CONV2D = Transform(_transpose((2, 3, 1, 0), "a 4-d OIHW weight"), _transpose((3, 2, 0, 1), "a 4-d HWIO kernel"))
DEPTHWISE_CONV2D = Transform(
    _transpose((2, 3, 1, 0), "a 4-d depthwise [C, 1, kh, kw] weight", lambda s: s[1] == 1),
    _transpose((3, 2, 0, 1), "a 4-d depthwise [kh, kw, 1, C] kernel", lambda s: s[2] == 1))


Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rename:
    """Checkpoint tensor ``source`` goes to the tree leaf at ``target`` (a tuple of keys, or one
    string of keys joined by '/'), through ``transform``."""
    source: str
    target: Union[Path, str]
    transform: Transform = IDENTITY

    def __post_init__(self):
        target = tuple(self.target.split("/")) if isinstance(self.target, str) else tuple(self.target)
        if not target or not all(isinstance(k, str) and k for k in target):
            raise ValueError(f"Rename {self.source!r}: target must be a non-empty tuple of non-empty strings, got {self.target!r}")
        if not isinstance(self.transform, Transform):
            raise ValueError(f"Rename {self.source!r}: transform must be a Transform(forward, inverse), "
                             f"got {type(self.transform).__name__}")
        object.__setattr__(self, "target", target)


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    """``{path: leaf}`` of a nested mapping (dict / FrozenDict); leaves are the non-mappings."""
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def _unflatten_like(template: Mapping, leaves: Mapping[Path, Any], prefix: Path = ()):
    """The template's nesting (and mapping types) with ``leaves[path]`` as leaves."""
    out = {}
    for key, value in template.items():
        path = prefix + (str(key),)
        out[key] = _unflatten_like(value, leaves, path) if isinstance(value, Mapping) else leaves[path]
    return out if type(template) is dict else type(template)(out)


def _shown(names: Sequence[str]) -> str:
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _check_renames(renames: Sequence[Rename]) -> None:
    """Each source and each target named once."""
    for field in ("source", "target"):
        seen: set = set()
        for r in renames:
            key = getattr(r, field)
            if key in seen:
                shown = "/".join(key) if field == "target" else key
                raise ValueError(f"two Renames share the {field} {shown!r}")
            seen.add(key)


def _kind(dtype: np.dtype) -> str:
    """'float' / 'int' / 'bool': casts within a kind are allowed, across kinds they are refused."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    return "int" if np.issubdtype(dtype, np.integer) else "float"


def load_into(template: Mapping, state: Mapping[str, np.ndarray], renames: Sequence[Rename], *,
              what: str = "checkpoint", keep: Iterable[str] = (), ignore: Iterable[str] = ()) -> Any:
    """Fill ``template`` from the flat checkpoint ``state`` through ``renames``.

    Args:
      template: the model's parameter tree (arrays or ``jax.ShapeDtypeStruct`` leaves), e.g.
        ``model.init(...)["params"]`` or its ``jax.eval_shape``. Every Rename target must be a leaf.
      state: ``{name: array}``, e.g. :func:`mtl_jax.checkpoints.read_checkpoint`'s result.
      renames: one :class:`Rename` per checkpoint tensor the model takes.
      what: names the checkpoint in error messages (e.g. ``"MiniLM-L6"``).
      keep: regexes (``re.fullmatch`` on the '/'-joined path) of template leaves no Rename fills
        that keep their template value (e.g. task heads); such leaves must be concrete arrays.
      ignore: regexes (``re.fullmatch``) of checkpoint names no Rename takes that are skipped
        rather than reported as unexpected (e.g. ``r".*num_batches_tracked"``, a pooler).

    Returns:
      The template's tree with host numpy arrays in the template's dtypes (``jax.device_put`` them
      where needed).

    Raises:
      CheckpointMismatchError: listing (first few of each, with counts) checkpoint names a Rename
        needs but ``state`` lacks, ``state`` names no Rename takes, tensors whose shape after the
        transform (or dtype kind) differs from the template's, and template leaves that neither a
        Rename nor ``keep`` covers, or that a Rename targets but do not exist. Nothing is loaded.
    """
    renames = list(renames)
    _check_renames(renames)
    keep_patterns = [re.compile(p) for p in keep]
    ignore_patterns = [re.compile(p) for p in ignore]
    leaves = flatten(template)
    by_target = {r.target: r for r in renames}
    sources = {r.source for r in renames}

    missing = [r.source for r in renames if r.source not in state]
    unexpected = [name for name in state
                  if name not in sources and not any(p.fullmatch(name) for p in ignore_patterns)]
    no_leaf = ["/".join(r.target) for r in renames if r.target not in leaves]
    uncovered, abstract_kept = [], []
    for path, leaf in leaves.items():
        if path in by_target:
            continue
        joined = "/".join(path)
        if not any(p.fullmatch(joined) for p in keep_patterns):
            uncovered.append(joined)
        elif not isinstance(leaf, (np.ndarray, np.generic)) and not hasattr(leaf, "__array__"):
            abstract_kept.append(joined)

    loaded: dict[Path, np.ndarray] = {}
    mis_shaped = []
    for r in renames:
        if r.source not in state or r.target not in leaves:
            continue
        leaf, array = leaves[r.target], np.asarray(state[r.source])
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        try:
            value = r.transform.forward(array)
        except ValueError as e:
            mis_shaped.append(f"{r.source} {tuple(array.shape)}: {e}")
            continue
        if tuple(value.shape) != shape:
            mis_shaped.append(f"{r.source} {tuple(array.shape)} -> {tuple(value.shape)}, model "
                              f"{'/'.join(r.target)} {shape}")
        elif _kind(value.dtype) != _kind(dtype):
            mis_shaped.append(f"{r.source} {value.dtype} -> model {'/'.join(r.target)} {dtype}")
        else:
            loaded[r.target] = value.astype(dtype, copy=False)

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing from the checkpoint [{_shown(missing)}]")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected in the checkpoint [{_shown(unexpected)}]")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped [{_shown(mis_shaped)}]")
    if no_leaf:
        problems.append(f"{len(no_leaf)} Rename targets not in the model [{_shown(no_leaf)}]")
    if uncovered:
        problems.append(f"{len(uncovered)} model leaves no Rename fills (missing; keep=(regex,) keeps "
                        f"template values) [{_shown(uncovered)}]")
    if abstract_kept:
        problems.append(f"{len(abstract_kept)} kept model leaves have no value (abstract template) "
                        f"[{_shown(abstract_kept)}]")
    if problems:
        raise CheckpointMismatchError(
            f"{what}: the checkpoint does not fit the model, nothing loaded: " + "; ".join(problems),
            missing=missing + uncovered, unexpected=unexpected, mis_shaped=mis_shaped)

    for path, leaf in leaves.items():
        if path not in loaded:
            loaded[path] = np.asarray(leaf)
    return _unflatten_like(template, loaded)


def export(params: Mapping, renames: Sequence[Rename], *, dtype: Any = None) -> dict[str, np.ndarray]:
    """The flat checkpoint ``{source: array}`` (in ``renames`` order) of ``params``: each Rename's
    target leaf through its inverse transform; cast to ``dtype`` if given.

    Raises CheckpointMismatchError naming the Rename targets that ``params`` lacks.
    """
    renames = list(renames)
    _check_renames(renames)
    leaves = flatten(params)
    absent = ["/".join(r.target) for r in renames if r.target not in leaves]
    if absent:
        raise CheckpointMismatchError(f"export: {len(absent)} Rename targets not in the parameters "
                                      f"[{_shown(absent)}]", missing=absent)
    out = {}
    for r in renames:
        array = np.array(r.transform.inverse(np.asarray(leaves[r.target])), order="C", copy=True)
        out[r.source] = array if dtype is None else array.astype(dtype, copy=False)
    return out


def source_shapes(template: Mapping, renames: Sequence[Rename]) -> dict[str, list[int]]:
    """``{source name: shape}`` (in ``renames`` order) of the checkpoint that ``renames`` read into
    ``template`` (params or a ``jax.ShapeDtypeStruct`` tree), without building it: each transform's
    inverse is applied to a small zero probe whose distinct axis sizes reveal its axis permutation,
    so transforms must permute axes (IDENTITY, LINEAR, CONV2D, DEPTHWISE_CONV2D), not reshape."""
    leaves = flatten(template)
    shapes = {}
    for r in renames:
        shape = tuple(leaves[r.target].shape)
        probe = (2, 3, 5, 7, 11, 13)[: len(shape)]
        permuted = r.transform.inverse(np.zeros(probe, np.float32)).shape
        shapes[r.source] = [shape[probe.index(s)] for s in permuted]
    return shapes


__all__ = ["CONV2D", "DEPTHWISE_CONV2D", "IDENTITY", "LINEAR", "CheckpointMismatchError", "Rename",
           "Transform", "export", "flatten", "load_into", "source_shapes"]
