"""A dataset's inputs replaced by a frozen pretrained encoder's features, computed once and cached.

``with_frozen_features(dataset, name)`` runs the pretrained trunk ``name`` (``PRETRAINED`` in
``mtl_jax.models.pretrained.registry``: its module and weights) over every split's inputs in
evaluation mode, and returns a dataset whose input ``features`` [N, D] float32 holds the pooled
representations (e.g. MiniLM-L6's mean-pooled 384-d sentence embeddings), with the same labels.
Training then runs on the features alone: a frozen-encoder multi-task model is this dataset with a
trainable shared trunk (``mlp``) and heads on top.

The features are cached as ``<data_dir>/frozen_features/<name>-<digest>.npz`` (numeric arrays only,
read without pickle), ``digest`` = SHA-256 of the encoder name and every split's name and input
bytes, so a different tokenisation, split or encoder gets its own file; it is written to a
temporary sibling and renamed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import jax
import numpy as np

from mtl_jax.data.sources import Dataset, from_arrays, read_all

FEATURES_KEY = "features"


def inputs_digest(inputs_by_split: dict, name: str) -> str:
    """SHA-256 (hex) of ``name`` and every split's name, input shape, dtype and bytes
    (``inputs_by_split``: ``{split: inputs [N, ...]}``)."""
    digest = hashlib.sha256(name.encode())
    for split in sorted(inputs_by_split):
        inputs = np.ascontiguousarray(inputs_by_split[split])
        digest.update(f"{split}:{inputs.shape}:{inputs.dtype}".encode())
        digest.update(inputs.tobytes())
    return digest.hexdigest()


def encode(apply_fn, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """``apply_fn(batch)`` [b, D] over ``inputs`` [N, ...] in batches of ``batch_size`` (the last one
    padded with copies of the first row and cut) -> [N, D] float32."""
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[:1], pad, axis=0)])
        outputs.append(np.asarray(apply_fn(batch), np.float32)[:batch_size - pad])
    return np.concatenate(outputs)


def _save_atomic(path: str, arrays: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the cache is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def with_frozen_features(dataset: Dataset, name: str, data_dir: str, batch_size: int = 128) -> Dataset:
    """``dataset`` with its input replaced by the frozen trunk ``name``'s features (module docstring)."""
    from mtl_jax.models.pretrained.registry import pretrained_trunk

    arrays = {split: dict(read_all(source)) for split, source in dataset.splits.items()}
    inputs = {split: a.pop(dataset.input_key) for split, a in arrays.items()}
    path = os.path.join(data_dir, "frozen_features", f"{name}-{inputs_digest(inputs, name)[:16]}.npz")
    if os.path.exists(path):
        with np.load(path) as cached:
            features = {split: cached[split] for split in cached.files}
    else:
        module, variables = pretrained_trunk(name)
        apply = jax.jit(lambda v, x: module.apply(v, x, train=False))  # weights an argument, not a constant
        features = {split: encode(lambda x: apply(variables, x), x, batch_size) for split, x in inputs.items()}
        _save_atomic(path, features)
    splits = {split: {FEATURES_KEY: features[split], **a} for split, a in arrays.items()}
    return from_arrays(f"{dataset.name}+{name}", splits, dataset.tasks, input_key=FEATURES_KEY)
