"""Orbax PyTree checkpoints leaf by leaf: shapes and dtypes from the metadata, data by a
partial restore of just the leaves of a group; the output tree is collected and saved at the
end (this output format holds one output model in memory)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mtl_jax.merging.output_safety import commit, discard, fsync_tree, temp_sibling, write_marker
from mtl_jax.merging.streaming.planning import LeafSpec
from mtl_jax.merging.tree import path_to_str


class OrbaxReader:
    """Leaf-by-leaf reader of an orbax PyTree checkpoint directory: shapes/dtypes from its
    metadata, data by a partial restore of only the requested leaves (as numpy arrays). Leaf names
    are the '/'-joined key paths (:func:`mtl_jax.merging.tree.path_to_str`)."""

    def __init__(self, path: str):
        import orbax.checkpoint as ocp

        self.path = os.path.abspath(str(path))
        self._ocp = ocp
        self._ckptr = ocp.PyTreeCheckpointer()
        meta = self._ckptr.metadata(self.path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        self._keys: dict[str, tuple] = {}
        self.specs: dict[str, LeafSpec] = {}
        for keypath, m in leaves:
            name = path_to_str(keypath)
            self._keys[name] = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)
            self.specs[name] = LeafSpec(name, tuple(m.shape), np.dtype(m.dtype))

    def read_group(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        item: dict = {}
        for n in names:
            node = item
            *parents, last = self._keys[n]
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = 0
        restore_args = jax.tree_util.tree_map(lambda _: self._ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = self._ckptr.restore(
            self.path,
            args=self._ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
        out = {}
        for n in names:
            node = restored
            for k in self._keys[n]:
                node = node[k]
            out[n] = np.asarray(node)
        return out

    def read(self, name: str) -> np.ndarray:
        return self.read_group([name])[name]

    def close(self) -> None:
        self._ckptr.close()


class OrbaxWriter:
    """Collects the merged leaves and saves them as one orbax PyTree checkpoint on close (this
    output format holds the output model in memory). Names are split on '/' into nested dicts.
    Saved into a hidden temporary sibling dir with the marker file of a merge output
    (:func:`mtl_jax.merging.output_safety.write_marker`), fsynced and renamed over ``path``
    (a previous merge output there, or anything with ``overwrite``, is replaced only once the new
    checkpoint is complete)."""

    def __init__(self, path: str, specs: Sequence[LeafSpec], overwrite: bool = False, method: str = ""):
        self.path = os.path.abspath(str(path))
        self._specs = {s.name: s for s in specs}
        self._tree: dict = {}
        self._overwrite, self._method = overwrite, method

    def write(self, name: str, array: Any) -> None:
        node = self._tree
        *parents, last = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = np.array(array, dtype=self._specs[name].dtype)  # a copy: callers reuse buffers

    def patch(self, name: str, flat_index: np.ndarray, values: np.ndarray) -> None:
        """Overwrite entries ``flat_index`` (C order) of an already written leaf with ``values``."""
        node = self._tree
        for k in name.split("/"):
            node = node[k]
        node.reshape(-1)[flat_index] = np.asarray(values).astype(node.dtype)

    def rewind(self) -> None:
        """Start again from the first leaf."""
        self._tree = {}

    def close(self) -> None:
        import orbax.checkpoint as ocp

        tmp = temp_sibling(self.path)
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                ckptr.save(tmp, args=ocp.args.PyTreeSave(self._tree))  # a new path: nothing is replaced
            write_marker(tmp, self._method)
            fsync_tree(tmp)
            commit(tmp, self.path, self._overwrite)
        except BaseException:
            discard(tmp)
            raise
        finally:
            self._tree = {}

    def abort(self) -> None:
        self._tree = {}
