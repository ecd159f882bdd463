"""Mixed precision: float32 master parameters, the forward computed in a lower-precision dtype.

A ``Precision`` policy casts the floating parameters (except those whose path matches
``keep_float32``, e.g. normalisation scales) and the floating model input to ``compute`` inside
the differentiated forward, and the predictions back to float32 before the losses. Gradients
therefore arrive in float32 (the cast's transpose), the per-task losses, Gramians and optimiser
states are float32, and only the forward's matmuls and activations use the compute dtype (as in
mixed-precision training, Micikevicius et al. 2018, without loss scaling, which bfloat16's float32
exponent range does not need).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.registry import lookup
from mtl_jax.train.sharding import key_path_str

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Precision(NamedTuple):
    """``compute``: the forward's dtype; ``keep_float32``: regex over parameter paths left float32."""

    compute: object = jnp.float32
    keep_float32: str = ""

    @property
    def mixed(self) -> bool:
        return self.compute != jnp.float32


def precision_policy(name: str = "float32", keep_float32: str = "") -> Precision:
    """The policy for ``config.precision`` (a key of ``DTYPES``)."""
    return Precision(lookup(DTYPES, name, "precision"), keep_float32)


def cast_params(policy: Precision, params):
    """Floating leaves of ``params`` in the compute dtype (those matching ``keep_float32`` as they are).
    A leaf already in that dtype is returned as is (the layer-wise Gramian finds Dense kernels by
    identity)."""
    if not policy.mixed:
        return params

    def cast(path, x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == policy.compute:
            return x
        if policy.keep_float32 and re.search(policy.keep_float32, key_path_str(path)):
            return x
        return x.astype(policy.compute)

    return jax.tree_util.tree_map_with_path(cast, params)


def cast_input(policy: Precision, x):
    """The model input in the compute dtype: floating inputs cast, uint8 images cast and scaled to
    [0, 1] (what ``models.blocks.as_float`` does in float32); other integers (token ids) unchanged."""
    if not policy.mixed:
        return x
    if x.dtype == jnp.uint8:
        return x.astype(policy.compute) / jnp.asarray(255.0, policy.compute)
    return x.astype(policy.compute) if jnp.issubdtype(x.dtype, jnp.floating) else x


def to_float32(tree):
    """Floating leaves in float32 (predictions before the losses and metrics)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


FLOAT32 = Precision()
