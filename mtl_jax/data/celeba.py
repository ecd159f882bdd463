"""CelebA: 40 binary face attributes on the same aligned face image (FAMO's CelebA-40 benchmark).

Source: the user's copy of CelebA (Liu et al. 2015) in either of its common layouts (``data.manual_dir``):

    <manual_dir>/img_align_celeba/000001.jpg ...          (torchvision's ``celeba/`` folder), or
    <manual_dir>/Img/img_align_celeba/, Anno/, Eval/      (the official Google Drive folders, FAMO's
                                                            ``experiments/celeba/data.py``)
    list_attr_celeba.txt      line 1: the image count; line 2: the 40 attribute names; then one line
                              per image: '<file> ' + 40 values 1 / -1 (space-separated, padded)
    list_eval_partition.txt   '<file> <partition>' per image: 0 train, 1 validation, 2 test
                              (162,770 / 19,867 / 19,962 images)

Preprocessing as FAMO's ``CelebaDataset``: ``Image.open(...).convert('RGB')``, ``Resize((64, 64))``
(the 178 x 218 aligned face squeezed to 64 x 64, bilinear, no crop), ``ToTensor()`` (pixels / 255, no
mean / std normalisation). Stored as uint8 (exact: the resize yields uint8 pixels), decoded to float32
in [0, 1] when read.

Records: ``image`` float32 [S, S, 3] (``data.image_size`` S = 64); one int64 label per attribute,
keyed by its name in the file ('5_o_Clock_Shadow', ..., 'Young'): 1 where the file says 1, else 0
(FAMO's ``1 if elt == '1' else 0``). Tasks: one binary task per attribute (``mtl_jax.tasks.binary``:
one logit, sigmoid BCE, F1 accumulated over the split as FAMO's ``CelebaMetrics``).
Splits: ``train``, ``validation``, ``test`` (FAMO picks the epoch by validation F1).
"""

from __future__ import annotations

import os

import numpy as np

from mtl_jax import tasks as T
from mtl_jax.config import Rule
from mtl_jax.data.manual_dir import (
    DecodedSource, ManualDirBuilder, data_dir_of, listing_digest, load_rgb_resized, manual_dir, prepared_sources,
    read_options, require_dir, require_file, threaded_map, uint8_to_unit_float)
from mtl_jax.data.sources import Dataset

NUM_ATTRIBUTES = 40
PARTITIONS = {0: "train", 1: "validation", 2: "test"}
# (images folder, attribute file, partition file) relative to manual_dir, in the order tried.
LAYOUTS = (("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"),
           ("Img/img_align_celeba", "Anno/list_attr_celeba.txt", "Eval/list_eval_partition.txt"))

OPTIONS = dict(manual_dir="", image_size=64)
RULES = {"image_size": Rule("int", 1)}


def celeba_files(root: str) -> tuple[str, str, str]:
    """(images folder, list_attr_celeba.txt, list_eval_partition.txt) of the first layout of ``LAYOUTS``
    whose attribute file exists; FileNotFoundError naming the missing folder / file."""
    for layout in LAYOUTS:
        if os.path.isfile(os.path.join(root, layout[1])):
            images, attrs, parts = (os.path.join(root, p) for p in layout)
            return (require_dir(images, "CelebA images"), attrs,
                    require_file(parts, "CelebA list_eval_partition.txt"))
    raise FileNotFoundError(f"CelebA: file {os.path.join(root, LAYOUTS[0][1])} does not exist (nor "
                            f"{os.path.join(root, LAYOUTS[1][1])})")


def read_attributes(path: str) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """(attribute names, image file names, int64 labels [N, 40] in {0, 1}) of ``list_attr_celeba.txt``;
    ValueError naming the file and line of anything malformed."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(f"{path}: line 1 must be the image count, line 2 the {NUM_ATTRIBUTES} attribute names")
    names = tuple(lines[1].split())
    if len(names) != NUM_ATTRIBUTES:
        raise ValueError(f"{path}: line 2 names {len(names)} attributes, expected {NUM_ATTRIBUTES}")
    files, labels = [], []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != NUM_ATTRIBUTES + 1 or any(v not in ("1", "-1") for v in fields[1:]):
            raise ValueError(f"{path}: line {number} must be a file name and {NUM_ATTRIBUTES} values 1 / -1; "
                             f"got {line.strip()[:80]!r}")
        files.append(fields[0])
        labels.append([v == "1" for v in fields[1:]])
    if int(lines[0]) != len(files):
        raise ValueError(f"{path}: line 1 says {int(lines[0])} images, the file lists {len(files)}")
    return names, files, np.asarray(labels, np.int64).reshape(len(files), NUM_ATTRIBUTES)


def read_partition(path: str) -> dict[str, str]:
    """{image file: split name} of ``list_eval_partition.txt``; ValueError naming the file and line."""
    split_of = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ValueError(f"{path}: line {number} must be '<file> <0|1|2>'; got {line.strip()[:80]!r}")
            split_of[fields[0]] = PARTITIONS[int(fields[1])]
    return split_of


def attribute_tasks(names) -> tuple:
    return tuple(T.binary(name) for name in names)


def load_celeba(cfg) -> Dataset:
    """CelebA (module docstring) from ``cfg.manual_dir``, prepared once under ``cfg.data_dir``."""
    size = read_options(cfg, OPTIONS, RULES)["image_size"]
    images, attr_path, part_path = celeba_files(manual_dir(cfg, "celeba"))
    names, files, labels = read_attributes(attr_path)
    split_of = read_partition(part_path)
    missing = [name for name in files if name not in split_of]
    if missing:
        raise ValueError(f"{part_path}: no partition for {len(missing)} image(s) of {attr_path}, e.g. {missing[0]}")
    rows = {split: [i for i, name in enumerate(files) if split_of[name] == split] for split in PARTITIONS.values()}

    def examples(split):
        def generate():
            paths = [os.path.join(images, files[i]) for i in rows[split]]
            pixels = threaded_map(lambda p: load_rgb_resized(p, (size, size)), paths)
            for i, image in zip(rows[split], pixels):
                yield {"image": image, **{name: labels[i, k] for k, name in enumerate(names)}}
        return generate

    features = {"image": ((size, size, 3), np.uint8), **{name: ((), np.int64) for name in names}}
    builder = ManualDirBuilder(
        dataset_name="celeba", config_name=f"s{size}_{listing_digest([images, attr_path, part_path])}",
        features=features, examples={split: examples(split) for split in PARTITIONS.values() if rows[split]},
        description=__doc__, data_dir=data_dir_of(cfg))
    decode = uint8_to_unit_float("image")
    splits = {split: DecodedSource(source, decode) for split, source in prepared_sources(builder).items()}
    return Dataset(name="celeba", tasks=attribute_tasks(names), splits=splits, input_key="image")
