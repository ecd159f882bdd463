"""mtl_jax.data.image_folder indexing as torchvision's ImageFolder (IMG_EXTENSIONS, symbolic links
followed, cycles cut) and its decoded cache (no temporary left when decoding fails; an edited image
is decoded again)."""

import os

import numpy as np
import pytest

from mtl_jax.data.image_folder import IMAGE_EXTENSIONS, cache_images, read_image_folder


def _png(path, value, size=(8, 8)):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path, format="PNG")


def test_extensions_are_torchvisions():
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def test_index_follows_symlinks_and_cuts_cycles(tmp_path):
    root, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    _png(str(root / "cat" / "a.png"), 1)
    _png(str(root / "cat" / "b.PGM"), 2)  # torchvision: case-insensitive, .pgm is an image
    _png(str(root / "cat" / "c.gif"), 3)  # not in torchvision's IMG_EXTENSIONS
    _png(str(elsewhere / "more" / "d.png"), 4)
    os.symlink(elsewhere, root / "cat" / "linked")  # a folder link: followed
    os.symlink(root / "cat", root / "cat" / "linked" / "loop")  # back to the class folder: a cycle, cut
    _png(str(root / "dog" / "e.jpeg"), 5)
    index = read_image_folder(str(root))
    cat = str(root / "cat")
    assert index.classes == ("cat", "dog")
    assert index.paths == (f"{cat}/a.png", f"{cat}/b.PGM", f"{cat}/linked/more/d.png", str(root / "dog" / "e.jpeg"))
    assert index.labels.tolist() == [0, 0, 0, 1]


def test_cache_removes_its_temporary_when_decoding_fails(tmp_path):
    good, bad = str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")
    _png(good, 1)
    with open(bad, "wb") as f:
        f.write(b"not an image")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="cannot read image .*b.png"):
        cache_images([good, bad], str(cache / "test.npy"), 8, workers=1)
    assert os.listdir(cache) == []


def test_edited_image_is_decoded_again(tmp_path):
    from experiments.merging.clip_suite import _cached

    path = str(tmp_path / "img" / "a.png")
    _png(path, 10)
    x, _ = _cached([path], np.zeros(1), str(tmp_path / "cache"), "test", 8, 1)
    assert np.all(x == 10)
    _png(path, 200)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later edit, whatever the clock's grain
    x, _ = _cached([path], np.zeros(1), str(tmp_path / "cache"), "test", 8, 1)
    assert np.all(x == 200)
