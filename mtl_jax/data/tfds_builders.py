"""TF-free tfds builders: examples written to ``array_record`` and read back as random-access sources.

``tfds.features.Tensor`` features only (an ``Image`` feature needs TensorFlow to encode); reading goes
through ``builder.as_data_source(split)``, which grain consumes directly.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds

Arrays = Mapping[str, np.ndarray]


def default_data_dir() -> str:
    """Where prepared datasets go when ``config.data.data_dir`` is empty: ``$MTL_JAX_DATA_DIR``, else
    ``~/tensorflow_datasets``."""
    return os.environ.get("MTL_JAX_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


class ArrayDictBuilder(tfds.core.GeneratorBasedBuilder):
    """Writes ``{split: {key: array}}`` (from ``generate()``) as a tfds dataset in array_record format.

    ``generate`` is called only when the dataset is not already prepared in ``data_dir``;
    ``dataset_name`` and ``config_name`` name the directory ``data_dir/dataset_name/config_name/version``.
    Features (``tfds.features.Tensor``) are inferred from the generated arrays' per-example shape/dtype.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, dataset_name: str, generate: Callable[[], Mapping[str, Arrays]],
                 config_name: str = "default", description: str = "", data_dir: str | None = None):
        self.name = dataset_name
        self._generate = generate
        self._generated = None
        self._description = description
        super().__init__(data_dir=data_dir, config=tfds.core.BuilderConfig(name=config_name),
                         file_format="array_record")

    def _arrays(self) -> Mapping[str, Arrays]:
        if self._generated is None:
            self._generated = self._generate()
        return self._generated

    def _info(self) -> tfds.core.DatasetInfo:
        if self.data_path is not None and os.path.exists(os.path.join(self.data_path, "dataset_info.json")):
            # Already prepared: tfds restores the features from disk, no need to generate.
            return tfds.core.DatasetInfo(builder=self, description=self._description)
        first_split = next(iter(self._arrays().values()))
        features = {k: tfds.features.Tensor(shape=v.shape[1:], dtype=v.dtype) for k, v in first_split.items()}
        return tfds.core.DatasetInfo(builder=self, description=self._description,
                                     features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(arrays) for split, arrays in self._arrays().items()}

    def _generate_examples(self, arrays: Arrays):
        n = len(next(iter(arrays.values())))
        for i in range(n):
            yield i, {k: v[i] for k, v in arrays.items()}


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """download_and_prepare (a no-op if prepared) without network access; returns the builder."""
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def data_sources(builder: tfds.core.DatasetBuilder) -> dict:
    """{split: random-access source} for every split of a prepared builder."""
    return {split: builder.as_data_source(split=split) for split in builder.info.splits}
