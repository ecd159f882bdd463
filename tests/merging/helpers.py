"""Small random param trees and the flattened reference representation used by the tests."""

import jax
import numpy as np

SHAPES = {
    "shared": {
        "embed": {"embedding": (16, 8)},
        "block_0": {"Dense_0": {"kernel": (8, 16), "bias": (16,)}},
        "block_1": {"Dense_0": {"kernel": (16, 8), "bias": (8,)}},
        "block_2": {"Dense_0": {"kernel": (8, 8)}},
    },
    "heads": {"cls": {"kernel": (8, 8), "bias": (8,)}},
}


def random_tree(rng, shapes=SHAPES, scale=1.0, decimals=None):
    """Tree of float32 normal arrays with the given nested shape dict (optionally rounded so that
    magnitudes tie)."""

    def leaf(shape):
        x = rng.normal(size=shape) * scale
        if decimals is not None:
            x = np.round(x, decimals)
        return x.astype(np.float32)

    return jax.tree_util.tree_map(leaf, shapes, is_leaf=lambda s: isinstance(s, tuple))


def flat(tree):
    """All leaves concatenated in jax leaf order (the flattened reference representation)."""
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree_util.tree_leaves(tree)])


def unflat(vec, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, i = [], 0
    for x in leaves:
        n = int(np.size(x))
        out.append(np.asarray(vec[i : i + n]).reshape(np.shape(x)))
        i += n
    return treedef.unflatten(out)


def jit_merge(fn, **hparams):
    """``fn`` jitted with its hyperparameters bound (one XLA compile instead of many eager ops)."""
    import functools

    return jax.jit(functools.partial(fn, **hparams))
