"""NYUv2 and Cityscapes in the MTAN / LibMTL preprocessed layout (one ``.npy`` per example and label).

Source: Liu et al. 2019 (MTAN), the preprocessed releases linked from lorenmt/mtan's README, which
LibMTL (examples/nyu, examples/cityscapes), Nash-MTL and FAMO (experiments/nyuv2/data.py,
experiments/cityscapes/data.py) read with the same loader (``im2im_pred/create_dataset.py``):

    <manual_dir>/{train,val}/image/N.npy   [H, W, 3] float, RGB in [0, 1]
                            /label/N.npy   [H, W]    float (whole numbers), class or -1 = ignore
                            /depth/N.npy   [H, W, 1] float, 0 = invalid pixel
                            /normal/N.npy  [H, W, 3] float, unit normal, all-zero = invalid (NYUv2 only)

with ``N`` = 0 .. n-1 (the official loaders count the ``*.npy`` files of ``image/`` and load
``'{:d}.npy'.format(index)``; every array is channel-last on disk and cast with ``.float()``, so any
float dtype is accepted here, and whole-number float or integer labels).

* NYUv2: H x W = 288 x 384, 13 classes, 795 train / 654 test examples; folders image, label, depth,
  normal.
* Cityscapes (MTAN's 128 x 256 release): folders image, ``label_7`` / ``label_19`` (``label_2`` too,
  unused), depth (MTAN calls it inverse depth); 2,975 train / 500 test. ``data.num_classes`` picks 7
  (FAMO's ``label_7``; LibMTL's ``cityscapes2`` copy names the 7-class folder ``label``, read when
  ``label_7`` is absent) or 19.

Splits: ``train`` = ``train/``; ``test`` = ``val/``: these protocols have no validation split, the
on-disk ``val`` is the test set on which MTAN / Nash-MTL / FAMO report the mean of the last 10 epochs.

Records (the dense record format of issue 30): ``image`` float32 [H, W, 3] as on disk;
``segmentation`` int64 [H, W] (-1 = ignore); ``depth`` float32 [H, W, 1]; ``normal`` float32
[H, W, 3] (NYUv2). Every file is checked while the dataset is prepared: a missing file, a wrong
shape or dtype, or a label outside ``[0, C)`` other than -1 raises one line naming the file.

Augmentation (:func:`augment`, a pure numpy function of a record and a ``np.random.Generator``): the
RandomScaleCrop of lorenmt/mtan issue #34 (Jialong Wu) in ``create_dataset.py`` of MTAN, LibMTL
(``--aug``), Nash-MTL and FAMO, then a horizontal flip with probability 1/2 that negates the normals'
x component.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, NamedTuple

import numpy as np

from mtl_jax import tasks as T
from mtl_jax.config import Rule
from mtl_jax.data.manual_dir import (
    ManualDirBuilder, check_array, check_labels, data_dir_of, listing_digest, load_npy, manual_dir,
    prepared_sources, read_options, require_dir)
from mtl_jax.data.sources import Dataset

# Record split -> folder on disk.
SPLIT_FOLDERS = {"train": "train", "test": "val"}
# RandomScaleCrop's scales (MTAN create_dataset.py).
SCALES = (1.0, 1.2, 1.5)


class Layout(NamedTuple):
    """One dataset's on-disk layout: record key -> (folder, per-pixel channels or None for [H, W])."""

    name: str
    folders: Mapping[str, tuple]
    num_classes: int


def nyuv2_layout() -> Layout:
    return Layout("nyuv2", {"image": ("image", 3), "segmentation": ("label", None), "depth": ("depth", 1),
                            "normal": ("normal", 3)}, 13)


def cityscapes_layout(root: str, num_classes: int) -> Layout:
    """MTAN's ``label_<C>`` folder, or LibMTL's ``label`` for 7 classes when ``label_7`` is absent."""
    label = f"label_{num_classes}"
    if num_classes == 7 and not os.path.isdir(os.path.join(root, "train", label)) and os.path.isdir(
            os.path.join(root, "train", "label")):
        label = "label"
    return Layout("cityscapes", {"image": ("image", 3), "segmentation": (label, None), "depth": ("depth", 1)},
                  num_classes)


# The ``config.data`` keys of each dataset, with their defaults, and their rules.
# augment: MTAN's training augmentation (:func:`augment`), which the MTAN / Nash-MTL / FAMO protocol uses
# for every method (LibMTL's ``--aug``).
NYUV2_OPTIONS = dict(manual_dir="", height=288, width=384, augment=False)
CITYSCAPES_OPTIONS = dict(manual_dir="", num_classes=7, height=128, width=256, augment=False)
NYUV2_RULES = {"height": Rule("int", 1), "width": Rule("int", 1), "augment": Rule("bool")}
CITYSCAPES_RULES = {**NYUV2_RULES, "num_classes": Rule("choice", choices=(7, 19), what="Cityscapes class count")}


def example_count(root: str, split_folder: str, layout: Layout) -> int:
    """n, the number of ``N.npy`` files of ``image/`` (named 0 .. n-1), after checking that every
    folder of ``layout`` holds the same names: FileNotFoundError naming the first missing file."""
    folder = require_dir(os.path.join(root, split_folder), f"{layout.name} split folder")
    for key, (name, _) in layout.folders.items():
        require_dir(os.path.join(folder, name), f"{layout.name} '{key}' folder")
    names = [f for f in os.listdir(os.path.join(folder, "image")) if f.endswith(".npy")]
    n = len(names)
    odd = sorted(f for f in names if not re.fullmatch(r"(0|[1-9][0-9]*)\.npy", f) or int(f[:-4]) >= n)
    if odd:
        raise ValueError(f"{os.path.join(folder, 'image', odd[0])}: the {n} image files must be named 0.npy .. "
                         f"{n - 1}.npy (the MTAN loaders read index N from N.npy)")
    for key, (name, _) in layout.folders.items():
        for i in range(n):
            path = os.path.join(folder, name, f"{i}.npy")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{layout.name}: file {path} does not exist (image/{i}.npy does)")
    if n == 0:
        raise FileNotFoundError(f"{layout.name}: no .npy files in {os.path.join(folder, 'image')}")
    return n


def read_example(folder: str, index: int, layout: Layout, height: int, width: int) -> dict:
    """Example ``index`` of a split folder as a record, every file checked (module docstring)."""
    record = {}
    for key, (name, channels) in layout.folders.items():
        path = os.path.join(folder, name, f"{index}.npy")
        shape = (height, width) if channels is None else (height, width, channels)
        array = check_array(path, load_npy(path), shape, "fiu" if key == "segmentation" else "f")
        if key == "segmentation":
            record[key] = check_labels(path, array, layout.num_classes)
        else:
            record[key] = array.astype(np.float32)
    return record


def record_features(layout: Layout, height: int, width: int) -> dict:
    return {key: ((height, width) if channels is None else (height, width, channels),
                  np.int64 if key == "segmentation" else np.float32)
            for key, (_, channels) in layout.folders.items()}


def dense_tasks(layout: Layout) -> tuple:
    """Segmentation (C classes), depth and (NYUv2) normal task specs with LibMTL's losses / metrics."""
    tasks = [T.segmentation("segmentation", layout.num_classes), T.depth("depth")]
    return tuple(tasks + ([T.normal("normal")] if "normal" in layout.folders else []))


def load_mtan_npy(root: str, layout: Layout, height: int, width: int, data_dir: str,
                  train_augment: bool = False) -> Dataset:
    """The dataset of ``layout`` at ``root`` (module docstring), prepared once under ``data_dir``;
    ``train_augment``: training examples go through :func:`augment`."""
    counts = {split: example_count(root, folder, layout) for split, folder in SPLIT_FOLDERS.items()}
    files = [os.path.join(root, folder, name, f"{i}.npy") for split, folder in SPLIT_FOLDERS.items()
             for name, _ in layout.folders.values() for i in range(counts[split])]

    def examples(split):
        folder = os.path.join(root, SPLIT_FOLDERS[split])
        return lambda: (read_example(folder, i, layout, height, width) for i in range(counts[split]))

    label_folder = layout.folders["segmentation"][0]
    builder = ManualDirBuilder(
        dataset_name=f"{layout.name}_mtan",
        config_name=f"{label_folder}_c{layout.num_classes}_{height}x{width}_{listing_digest(files)}",
        features=record_features(layout, height, width),
        examples={split: examples(split) for split in SPLIT_FOLDERS},
        description=__doc__, data_dir=data_dir)
    return Dataset(name=layout.name, tasks=dense_tasks(layout), splits=prepared_sources(builder), input_key="image",
                   augment=augment if train_augment else None)


def load_nyuv2(cfg) -> Dataset:
    """NYUv2 (MTAN preprocessing) from ``cfg.manual_dir``; ``cfg.height`` / ``cfg.width`` the files'
    resolution (288 x 384)."""
    o = read_options(cfg, NYUV2_OPTIONS, NYUV2_RULES)
    return load_mtan_npy(manual_dir(cfg, "nyuv2"), nyuv2_layout(), o["height"], o["width"], data_dir_of(cfg),
                         o["augment"])


def load_cityscapes(cfg) -> Dataset:
    """Cityscapes (MTAN preprocessing) from ``cfg.manual_dir``; ``cfg.num_classes`` 7 or 19;
    ``cfg.height`` / ``cfg.width`` the files' resolution (128 x 256)."""
    o = read_options(cfg, CITYSCAPES_OPTIONS, CITYSCAPES_RULES)
    root = manual_dir(cfg, "cityscapes")
    return load_mtan_npy(root, cityscapes_layout(root, o["num_classes"]), o["height"], o["width"], data_dir_of(cfg),
                         o["augment"])


# ---- augmentation (MTAN create_dataset.py RandomScaleCrop + horizontal flip) ----

def _bilinear_align_corners(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``x [h, w, C]`` resized to ``[height, width, C]`` as torch's ``F.interpolate(mode='bilinear',
    align_corners=True)``: output pixel i samples input position i * (h - 1) / (height - 1)."""
    h, w = x.shape[:2]

    def axis(n_in, n_out):  # float32 arithmetic, as torch's CPU kernel for float inputs
        scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
        pos = np.arange(n_out, dtype=np.float32) * scale
        lo = np.minimum(pos.astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo.astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = axis(h, height), axis(w, width)
    fy, fx = fy[:, None, None], fx[None, :, None]
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bottom = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(x.dtype)


def _nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """``x [h, w, ...]`` resized as torch's ``F.interpolate(mode='nearest')``: output pixel i reads input
    floor(i * h / height)."""
    h, w = x.shape[:2]

    def axis(n_in, n_out):  # float32 arithmetic, as torch's CPU kernel
        pos = np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out))
        return np.minimum(np.floor(pos).astype(np.int64), n_in - 1)

    return x[axis(h, height)][:, axis(w, width)]


def random_scale_crop(record: dict, rng: np.random.Generator, scales=SCALES) -> dict:
    """MTAN's RandomScaleCrop on one record: a scale ``sc`` drawn from ``scales``, a random crop of
    ``int(H / sc) x int(W / sc)`` resized back to H x W (image and normals bilinear with
    align_corners=True, segmentation and depth nearest), depth divided by ``sc``. Each of segmentation,
    depth and normal is optional (a record of a task subset, e.g. a single-task baseline)."""
    height, width = record["image"].shape[:2]
    sc = scales[int(rng.integers(len(scales)))]
    h, w = int(height / sc), int(width / sc)
    i, j = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
    out = dict(record)
    for key in ("image", "normal"):
        if key in record:
            out[key] = _bilinear_align_corners(record[key][i:i + h, j:j + w], height, width)
    if "segmentation" in record:
        out["segmentation"] = _nearest(record["segmentation"][i:i + h, j:j + w], height, width)
    if "depth" in record:
        out["depth"] = _nearest(record["depth"][i:i + h, j:j + w], height, width) / np.float32(sc)
    return out


def random_flip(record: dict, rng: np.random.Generator) -> dict:
    """With probability 1/2, every per-pixel array mirrored left-right and the normals' x negated."""
    if rng.random() >= 0.5:
        return record
    out = {k: (np.ascontiguousarray(v[:, ::-1]) if k in ("image", "segmentation", "depth", "normal") else v)
           for k, v in record.items()}
    if "normal" in out:
        out["normal"] = out["normal"] * np.array([-1.0, 1.0, 1.0], out["normal"].dtype)
    return out


def augment(record: dict, rng: np.random.Generator) -> dict:
    """The training augmentation of MTAN / LibMTL ``--aug`` / Nash-MTL / FAMO: :func:`random_scale_crop`
    then :func:`random_flip` (the shape of grain's ``MapDataset.random_map`` function)."""
    return random_flip(random_scale_crop(record, rng), rng)
