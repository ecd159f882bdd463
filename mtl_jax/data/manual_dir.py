"""Datasets read from a user's local copy (``data.manual_dir``): file checks that fail in one line, a
tfds builder that streams examples from those files into ``array_record``, and read-time decoding.

Checks (each raises one line naming the path and what was expected):

* :func:`require_dir` / :func:`require_file`: FileNotFoundError for a missing directory / file.
* :func:`load_npy`: a ``.npy`` read without pickle (an object array is refused).
* :func:`check_array`: ValueError for a shape or dtype other than the expected one.
* :func:`check_labels`: ValueError for class labels outside ``[0, num_classes)`` other than the
  ignore value, or labels that are not whole numbers.

:class:`ManualDirBuilder` is a TF-free tfds ``GeneratorBasedBuilder`` whose examples come from a
generator per split (one file read at a time, so a dataset larger than memory is prepared in one
pass); records keep the generator's order (``disable_shuffling``: record ``i`` of a split is its
``i``-th example). :class:`DecodedSource` applies a per-record function when a record is read (e.g.
uint8 pixels stored compactly -> float32 inputs), grain's random-access contract unchanged.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mtl_jax.config import describe, obeys
from mtl_jax.data.tfds_builders import default_data_dir, prepare

# The ignore value of a segmentation / classification label (LibMTL, MTAN; mtl_jax's 'not labelled').
IGNORE_LABEL = -1


def read_options(cfg, options: Mapping, rules: Mapping) -> dict:
    """``{key: cfg.get(key, default)}`` for the dataset's ``options``, each checked against its rule in
    ``rules`` (ValueError naming ``data.<key>``, its value and what is valid)."""
    values = {key: cfg.get(key, default) for key, default in options.items()}
    for key, rule in rules.items():
        if not obeys(values[key], rule):
            raise ValueError(f"data.{key} = {values[key]!r} is invalid: expected {describe(rule)}")
    return values


def require_dir(path: str, what: str) -> str:
    """``path`` if it is a directory, else FileNotFoundError naming ``what`` and the path."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: directory {path} does not exist")
    return path


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file, else FileNotFoundError naming ``what`` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file {path} does not exist")
    return path


def manual_dir(cfg, dataset: str) -> str:
    """``cfg.manual_dir`` (the user's copy of ``dataset``), checked to be an existing directory."""
    path = os.path.expanduser(str(cfg.get("manual_dir", "") or ""))
    if not path:
        raise ValueError(f"dataset '{dataset}' reads a local copy: set data.manual_dir to its folder")
    return require_dir(path, f"data.manual_dir of dataset '{dataset}'")


def load_npy(path: str) -> np.ndarray:
    """The array in ``path`` (``.npy``), never unpickled: ValueError naming the file for anything else
    (an object array, a truncated or empty file, an ``.npz`` archive)."""
    require_file(path, "npy")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a numeric .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ValueError(f"{path}: an .npz archive, not a .npy array")
    return array


def _dtype_kinds_text(kinds: str) -> str:
    names = {"f": "float", "i": "signed int", "u": "unsigned int", "b": "bool"}
    return " or ".join(names[k] for k in kinds)


def check_array(path: str, array: np.ndarray, shape: Sequence[int], dtype_kinds: str = "fiu") -> np.ndarray:
    """``array`` (read from ``path``) if its shape is ``shape`` and its dtype kind one of ``dtype_kinds``
    (numpy kind letters: 'f' float, 'i' int, 'u' unsigned, 'b' bool); else ValueError naming the file,
    what it holds and what was expected."""
    shape = tuple(int(s) for s in shape)
    if array.shape != shape or array.dtype.kind not in dtype_kinds:
        raise ValueError(f"{path}: array of shape {array.shape} and dtype {array.dtype}, expected shape {shape} "
                         f"and a {_dtype_kinds_text(dtype_kinds)} dtype")
    return array


def check_labels(path: str, labels: np.ndarray, num_classes: int, ignore: int | None = IGNORE_LABEL) -> np.ndarray:
    """``labels`` as int64 if every value is a whole number in ``[0, num_classes)`` or ``ignore``; else
    ValueError naming the file, up to five offending values and the valid range."""
    labels = np.asarray(labels)
    whole = np.ones(labels.shape, bool)
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
    valid = whole & (((labels >= 0) & (labels < num_classes)) | ((labels == ignore) if ignore is not None else False))
    if not valid.all():
        bad = np.unique(labels[~valid])[:5].tolist()
        allowed = f"0..{num_classes - 1}" + (f" or {ignore} (ignore)" if ignore is not None else "")
        raise ValueError(f"{path}: labels {bad} outside the {num_classes} classes (valid: {allowed})")
    return labels.astype(np.int64)


def listing_digest(paths: Iterable[str]) -> str:
    """A short digest of the files' names, sizes and modification times (cheap for a large dataset: a
    prepared dataset is rebuilt when the user's files change)."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


Features = Mapping[str, tuple]  # {key: (per-example shape, numpy dtype)}


class ManualDirBuilder(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset (array_record) whose examples stream from ``examples[split]()`` (an iterable of
    ``{key: array}`` matching ``features``), in order; prepared once under
    ``data_dir/dataset_name/config_name/version``.

    Args:
      dataset_name: the prepared directory's dataset name.
      config_name: its config name (put the options and a digest of the source files into it).
      features: ``{key: (shape, dtype)}`` of one example.
      examples: ``{split: () -> iterable of examples}``; called only when the dataset is not prepared.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, dataset_name: str, config_name: str, features: Features,
                 examples: Mapping[str, Callable[[], Iterable[Mapping[str, np.ndarray]]]],
                 description: str = "", data_dir: str | None = None):
        self.name = dataset_name
        self._features = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in features.items()}
        self._examples = examples
        self._description = description
        super().__init__(data_dir=data_dir, config=tfds.core.BuilderConfig(name=config_name),
                         file_format="array_record")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {k: tfds.features.Tensor(shape=shape, dtype=dtype) for k, (shape, dtype) in self._features.items()}
        return tfds.core.DatasetInfo(builder=self, description=self._description, disable_shuffling=True,
                                     features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(make) for split, make in self._examples.items()}

    def _generate_examples(self, make):
        for i, example in enumerate(make()):
            yield i, {k: np.asarray(example[k], dtype) for k, (_, dtype) in self._features.items()}


def prepared_sources(builder: ManualDirBuilder) -> dict:
    """``{split: random-access source}`` of ``builder`` after preparing it (no network)."""
    prepare(builder)
    return {split: builder.as_data_source(split=split) for split in builder.info.splits}


def data_dir_of(cfg) -> str:
    """Where prepared datasets go: ``cfg.data_dir`` or the default (``$MTL_JAX_DATA_DIR``)."""
    return cfg.get("data_dir") or default_data_dir()


class DecodedSource:
    """``source`` with ``decode(record) -> record`` applied as each record is read (grain's contract:
    ``len``, ``[i]``, ``__getitems__``)."""

    def __init__(self, source, decode: Callable[[dict], dict]):
        self.source = source
        self.decode = decode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        return self.decode(dict(self.source[index]))

    def __getitems__(self, indices: Sequence[int]):
        records = self.source.__getitems__(indices) if hasattr(self.source, "__getitems__") else [
            self.source[i] for i in indices]
        return [self.decode(dict(r)) for r in records]


def uint8_to_unit_float(key: str = "image", mean: Sequence[float] = (), std: Sequence[float] = ()):
    """A ``decode`` for :class:`DecodedSource`: ``record[key]`` uint8 -> float32 in [0, 1] (torchvision's
    ``ToTensor``), then ``(x - mean) / std`` per channel when given (``Normalize``)."""
    mean_arr = np.asarray(mean, np.float32) if len(mean) else None
    std_arr = np.asarray(std, np.float32) if len(std) else None

    def decode(record: dict) -> dict:
        x = np.asarray(record[key], np.float32) / np.float32(255.0)
        if mean_arr is not None:
            x = (x - mean_arr) / std_arr
        record[key] = x
        return record

    return decode


def load_rgb_resized(path: str, size: tuple) -> np.ndarray:
    """uint8 [height, width, 3]: the image at ``path`` converted to RGB and resized to ``size`` =
    (height, width) with PIL's bilinear filter (torchvision's ``Resize((h, w))`` on a PIL image);
    FileNotFoundError / ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    require_file(path, "image")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    height, width = size
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.BILINEAR)
    return np.asarray(rgb, np.uint8)


def threaded_map(fn: Callable, items: Sequence, chunk: int = 256, threads: int = 8) -> Iterable:
    """``fn(item)`` for every item, in order, computed by a thread pool a chunk at a time (PIL decodes
    without holding the GIL; at most ``chunk`` results in memory)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1))) as pool:
        for start in range(0, len(items), chunk):
            yield from pool.map(fn, items[start:start + chunk])
