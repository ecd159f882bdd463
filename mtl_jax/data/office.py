"""Office-31 and Office-Home: one classification task per image domain (the multi-input benchmarks of
LibMTL's ``examples/office``).

Source: the user's copy (``data.manual_dir``) in the layout of the original archives, which LibMTL's
lists address relative to that folder:

    Office-31 (Saenko et al. 2010; 4,110 images, 31 classes):
        <manual_dir>/{amazon,dslr,webcam}/images/<class>/*.jpg
    Office-Home (Venkateswara et al. 2017; 15,588 images, 65 classes):
        <manual_dir>/{Art,Clipart,Product,Real_World}/<class>/*.jpg   ('Real World' also accepted)

Splits: LibMTL ships lists ``examples/office/data_txt/{office-31,office-home}/<domain>_{train,val,test}.txt``
(lines '<path relative to manual_dir> <label>'; a random 60 / 20 / 20 split per domain). Point
``data.split_lists`` at that folder (or put the txt files into ``manual_dir``) to use LibMTL's exact
split and labels. Without lists, each domain's images (sorted by path) are permuted with
``data.split_seed`` and cut 60 / 20 / 20 (LibMTL's proportions, another draw), each labelled by its
class folder in LibMTL's class order (``OFFICE31_CLASSES`` / ``OFFICE_HOME_CLASSES``: the label ids of
its lists, which are not alphabetical).

Preprocessing (LibMTL ``office_Dataset``): RGB, ``Resize((S, S))`` (S = ``data.image_size``, 224;
bilinear, no crop), ``ToTensor``, ``Normalize`` with ImageNet's mean / std. Stored as uint8 [S, S, 3]
(exact), normalised to float32 when read.

Records: ``image`` float32 [S, S, 3]; one int64 label per domain (the task named after it, e.g.
``amazon``), -1 for the domains the image is not from ("not labelled": its loss and metrics skip it,
as ``datasets.mixture_of_task_datasets`` does). Splits ``train`` / ``validation`` / ``test`` hold every
domain's images of that split, domain after domain; a training batch mixes domains in proportion to
their sizes (LibMTL's multi-input trainer instead draws one batch per domain each step).
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from mtl_jax import tasks as T
from mtl_jax.config import Rule
from mtl_jax.data.manual_dir import (
    IGNORE_LABEL, DecodedSource, ManualDirBuilder, data_dir_of, load_rgb_resized, manual_dir, prepared_sources,
    read_options, require_dir, require_file, threaded_map, uint8_to_unit_float)
from mtl_jax.data.sources import Dataset

# Class names in LibMTL's label order (examples/office/data_txt: label i = i-th name, every domain).
OFFICE31_CLASSES = tuple(
    "back_pack paper_notebook desktop_computer scissors calculator desk_chair mouse laptop_computer desk_lamp "
    "stapler bottle phone tape_dispenser trash_can bookcase pen ring_binder mobile_phone ruler headphones "
    "bike_helmet monitor mug letter_tray projector printer speaker bike keyboard file_cabinet punchers".split())
OFFICE_HOME_CLASSES = tuple(
    "Calendar Postit_Notes Candles File_Cabinet Table Toys Chair Scissors Sneakers Clipboards Spoon Flipflops "
    "Drill Oven Ruler Refrigerator Helmet Bike Knives Webcam ToothBrush Telephone Couch Glasses Bed Eraser "
    "Printer Mug Bottle Exit_Sign Batteries Mouse Computer Shelf Bucket Monitor Folder Radio Calculator Soda "
    "Flowers Desk_Lamp Mop Marker Fan Lamp_Shade Hammer Backpack Pen Pencil Paper_Clip Kettle Fork Screwdriver "
    "Curtains Keyboard Speaker Notebook Sink Push_Pin TV Laptop Alarm_Clock Pan Trash_Can".split())
# benchmark -> (domains, classes, folder between the domain and the class folders)
BENCHMARKS = {
    "office31": (("amazon", "dslr", "webcam"), OFFICE31_CLASSES, "images"),
    "office_home": (("Art", "Clipart", "Product", "Real_World"), OFFICE_HOME_CLASSES, ""),
}
# record split -> LibMTL list suffix
SPLITS = {"train": "train", "validation": "val", "test": "test"}
FRACTIONS = (0.6, 0.2)  # train, validation; test = the rest
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

OPTIONS = dict(manual_dir="", image_size=224, split_lists="", split_seed=0)
RULES = {"image_size": Rule("int", 1), "split_seed": Rule("int", 0, 2**32 - 1)}


def domain_folder(root: str, domain: str) -> str:
    """``root/domain`` ('Real_World' may be on disk as 'Real World', the archive's name)."""
    path = os.path.join(root, domain)
    if not os.path.isdir(path) and os.path.isdir(os.path.join(root, domain.replace("_", " "))):
        return os.path.join(root, domain.replace("_", " "))
    return require_dir(path, f"Office domain '{domain}'")


def read_list(path: str, root: str, num_classes: int) -> list[tuple[str, int]]:
    """(image path, label) of a LibMTL list (lines '<path relative to root> <label>'); ValueError naming
    the file and line of a malformed line or a label outside the classes."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            relative, _, label = line.rstrip("\n").rpartition(" ")
            if not relative or not label.lstrip("-").isdigit():
                raise ValueError(f"{path}: line {number} must be '<image path> <label>'; got {line.strip()[:80]!r}")
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"{path}: line {number}: label {int(label)} outside the {num_classes} classes "
                                 f"(valid: 0..{num_classes - 1})")
            first, _, rest = relative.partition("/")
            spaced = first.replace("_", " ")
            if not os.path.isdir(os.path.join(root, first)) and os.path.isdir(os.path.join(root, spaced)):
                relative = spaced + "/" + rest
            items.append((os.path.join(root, relative), int(label)))
    return items


def folder_split(root: str, domain: str, classes: Sequence[str], middle: str, seed: int) -> dict:
    """{split: [(image path, label)]} of one domain from its class folders (module docstring)."""
    base = domain_folder(root, domain)
    base = require_dir(os.path.join(base, middle), f"Office domain '{domain}' images") if middle else base
    present = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    unknown = [d for d in present if d not in classes]
    if unknown:
        raise ValueError(f"{base}: class folders {unknown[:5]} are not classes of this benchmark "
                         f"(expected names from {list(classes[:5])} ...)")
    items = [(os.path.join(base, c, name), classes.index(c)) for c in present
             for name in sorted(os.listdir(os.path.join(base, c))) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not items:
        raise FileNotFoundError(f"Office domain '{domain}': no images under {base}")
    order = np.random.default_rng(seed).permutation(len(items))
    cut1, cut2 = int(FRACTIONS[0] * len(items)), int((FRACTIONS[0] + FRACTIONS[1]) * len(items))
    parts = {"train": order[:cut1], "validation": order[cut1:cut2], "test": order[cut2:]}
    return {split: [items[i] for i in rows] for split, rows in parts.items()}


def office_items(root: str, benchmark: str, lists: str, seed: int) -> dict:
    """{split: {domain: [(image path, label)]}} from LibMTL's lists in ``lists`` (or in ``root`` when it
    holds them), else from the class folders."""
    domains, classes, middle = BENCHMARKS[benchmark]
    folder = lists or (root if os.path.isfile(os.path.join(root, f"{domains[0]}_train.txt")) else "")
    if folder:
        require_dir(folder, "data.split_lists")
        return {split: {d: read_list(require_file(os.path.join(folder, f"{d}_{suffix}.txt"), "Office split list"),
                                     root, len(classes)) for d in domains}
                for split, suffix in SPLITS.items()}
    per_domain = {d: folder_split(root, d, classes, middle, seed) for d in domains}
    return {split: {d: per_domain[d][split] for d in domains} for split in SPLITS}


def load_office(cfg, benchmark: str) -> Dataset:
    """Office-31 (``benchmark='office31'``) or Office-Home ('office_home'), module docstring."""
    o = read_options(cfg, OPTIONS, RULES)
    root = manual_dir(cfg, benchmark)
    domains, classes, _ = BENCHMARKS[benchmark]
    items = office_items(root, benchmark, os.path.expanduser(str(o["split_lists"] or "")), o["split_seed"])
    size = o["image_size"]

    def examples(split):
        def generate():
            rows = [(path, d, label) for d in domains for path, label in items[split][d]]
            pixels = threaded_map(lambda row: load_rgb_resized(row[0], (size, size)), rows)
            for (_, domain, label), image in zip(rows, pixels):
                yield {"image": image, **{d: label if d == domain else IGNORE_LABEL for d in domains}}
        return generate

    features = {"image": ((size, size, 3), np.uint8), **{d: ((), np.int64) for d in domains}}
    manifest = "\n".join(f"{split} {path} {label}" for split in SPLITS for d in domains
                         for path, label in items[split][d])
    name = f"s{size}_{hashlib.sha256(manifest.encode()).hexdigest()[:12]}"
    builder = ManualDirBuilder(
        dataset_name=benchmark, config_name=name, features=features,
        examples={split: examples(split) for split in SPLITS}, description=__doc__, data_dir=data_dir_of(cfg))
    decode = uint8_to_unit_float("image", IMAGENET_MEAN, IMAGENET_STD)
    splits = {split: DecodedSource(source, decode) for split, source in prepared_sources(builder).items()}
    tasks = tuple(T.classification(d, len(classes)) for d in domains)
    return Dataset(name=benchmark, tasks=tasks, splits=splits, input_key="image")


def load_office31(cfg) -> Dataset:
    return load_office(cfg, "office31")


def load_office_home(cfg) -> Dataset:
    return load_office(cfg, "office_home")
