"""Pretrained weights into a multi-task model: every copy of the trunk under ``'shared'`` gets them.

``fill_trunks(variables, trunk_variables)`` takes the model's freshly initialised variables
(``{'params': {'shared': ..., 'heads': ...}, 'batch_stats': {...}?}``) and the trunk's pretrained
variables (``{'params': <trunk tree>, 'batch_stats': <trunk tree>?}``) and puts the pretrained trees
wherever the shared subtree has exactly the trunk's structure and shapes: ``'shared'`` itself under
hard parameter sharing, each expert under MMoE / CGC / DSelect-k (every expert starts from the
pretrained weights, as the papers that fine-tune a pretrained backbone with experts do). Heads and any
other shared parameters (gates, task towers) keep their initial values.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

from mtl_jax.errors import UsageError


def _signature(tree) -> tuple:
    """Structure + shapes + dtypes of a tree: two trees with equal signatures are interchangeable."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def _replace_matching(tree, target: tuple, value, path: str, found: list):
    """``tree`` with every subtree whose signature equals ``target`` replaced by ``value``; the paths
    replaced are appended to ``found``."""
    if _signature(tree) == target:
        found.append(path or "shared")
        return value
    if isinstance(tree, Mapping):
        return {k: _replace_matching(v, target, value, f"{path}/{k}" if path else k, found) for k, v in tree.items()}
    return tree


def fill_trunks(variables: Mapping[str, Any], trunk_variables: Mapping[str, Any], what: str) -> dict:
    """``variables`` with each collection's ``'shared'`` subtrees that match ``trunk_variables[collection]``
    replaced by it (see the module docstring). UsageError naming ``what`` (e.g. ``model.pretrained
    'minilm_l6'``) when the model has no such subtree or a collection of the pretrained weights is absent."""
    out = dict(variables)
    for collection, trunk_tree in trunk_variables.items():
        shared = variables.get(collection, {}).get("shared")
        if shared is None:
            raise UsageError(f"{what}: the model has no '{collection}/shared' variables to fill; its collections: "
                             f"{sorted(variables)}")
        found: list[str] = []
        filled = _replace_matching(shared, _signature(trunk_tree), trunk_tree, "", found)
        if not found:
            shapes = jax.tree.map(lambda x: tuple(x.shape), trunk_tree)
            some = dict(list(jax.tree_util.tree_leaves_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple)))[:3])
            raise UsageError(f"{what}: no subtree of '{collection}/shared' has the pretrained trunk's parameters "
                             f"(first of them: { {jax.tree_util.keystr(k): v for k, v in some.items()} }); "
                             f"the model's trunk must be the pretrained architecture with its default options")
        out[collection] = {**variables[collection], "shared": filled}
    return out
