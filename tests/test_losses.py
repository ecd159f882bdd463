"""The classification losses against optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.train.losses import integer_label_cross_entropy


def test_integer_label_cross_entropy_equals_optax_bit_for_bit_without_a_scatter():
    """Values and gradients equal optax's ``softmax_cross_entropy_with_integer_labels`` exactly
    (classifier logits, pixel logits, 1000 classes, logits up to +-80), and the gradient's program
    has no scatter (optax's ``take_along_axis`` transposes to a scatter-add)."""
    rng = np.random.default_rng(0)
    for shape, classes, scale in (((256,), 10, 5.0), ((4, 8, 8), 7, 1.0), ((3,), 1000, 80.0)):
        logits = jnp.asarray(rng.normal(size=shape + (classes,)) * scale, jnp.float32)
        labels = jnp.asarray(rng.integers(0, classes, shape), jnp.int32)
        ours = lambda x: integer_label_cross_entropy(x, labels)
        ref = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels)
        np.testing.assert_array_equal(ours(logits), ref(logits))
        np.testing.assert_array_equal(jax.grad(lambda x: ours(x).sum())(logits),
                                      jax.grad(lambda x: ref(x).sum())(logits))
    grad_program = str(jax.make_jaxpr(jax.grad(lambda x: integer_label_cross_entropy(x, labels).sum()))(logits))
    assert "scatter" not in grad_program
