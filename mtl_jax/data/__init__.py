"""Data: tfds (array_record, TF-free) and in-memory datasets, batched by grain and placed on the mesh."""

from mtl_jax.data.datasets import DATASETS, get_dataset
from mtl_jax.data.sources import ArraySource, Dataset, from_arrays

__all__ = ["DATASETS", "get_dataset", "ArraySource", "Dataset", "from_arrays"]
