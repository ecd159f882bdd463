"""mtl_jax: multi-task learning in JAX/Flax (models, sharded MTL training, model merging)."""

__version__ = "0.1.0"
