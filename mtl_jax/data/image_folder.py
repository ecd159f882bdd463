"""Image-classification folders read as CLIP inputs, decoded in batches and cached as uint8 arrays.

Layout (torchvision ``ImageFolder``, the one task arithmetic's data preparation produces for
SUN397, DTD and EuroSAT and the one every dataset of the CLIP 8-task benchmark can be exported to)::

    <root>/<split>/<class folder>/**/<image>.{jpg,jpeg,png,ppm,bmp,pgm,tif,tiff,webp}

Indexing follows torchvision's ``ImageFolder`` (``torchvision/datasets/folder.py``): classes are the
sub-folders of ``<root>/<split>`` in sorted order (label i = i-th folder); images are the files under
each class folder whose lowercased name ends in one of torchvision's ``IMG_EXTENSIONS``
(:data:`IMAGE_EXTENSIONS`), found by ``os.walk`` following symbolic links (``followlinks=True``), in
torchvision's order (folders sorted by path, files by name). Unlike torchvision, a link back to a
folder already on the walk (a cycle) is not followed.
Task arithmetic's folders use ``val`` as the test split of SUN397 and DTD (``sun397/{train,val}``,
``dtd/{train,val}``) and ``EuroSAT_splits/{train,val,test}``: :func:`split_folder` takes a list of
candidate split names and uses the first that exists.

Preprocessing (open_clip / OpenAI CLIP's eval transform): RGB, resize the shorter side to ``size``
with bicubic interpolation (torchvision ``Resize(size)``: the longer side becomes
``int(size * long / short)``), centre crop ``size x size`` (offsets ``round((h - size) / 2)``),
kept as uint8 [size, size, 3]; the model divides by 255 and normalises with CLIP's mean / std
(``mtl_jax.models.pretrained.clip.CLIPImageEncoder``), which equals ``ToTensor`` + ``Normalize``.

Images are decoded by a thread pool in chunks and written to a ``.npy`` file opened as a memory
map (:func:`cache_images`), so a split never has to fit in host memory; :class:`Batches` streams a
cached array to the device in fixed-size padded batches. A cache is named by :func:`cache_key`
(paths, sizes and modification times of the files, and the image size), so an edited image is
decoded again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import secrets
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(NamedTuple):
    """One split of an image folder: ``classes`` (folder names, sorted), ``paths`` [N] and
    ``labels`` int32 [N] (index into ``classes``)."""

    root: str
    classes: tuple
    paths: tuple
    labels: np.ndarray


def split_folder(dataset_root: str, candidates: Sequence[str]) -> str:
    """The first existing ``<dataset_root>/<candidate>`` folder; FileNotFoundError naming them all."""
    if not os.path.isdir(dataset_root):
        raise FileNotFoundError(f"dataset folder {dataset_root!r} does not exist")
    for name in candidates:
        path = os.path.join(dataset_root, name)
        if os.path.isdir(path):
            return path
    present = sorted(e for e in os.listdir(dataset_root) if os.path.isdir(os.path.join(dataset_root, e)))
    raise FileNotFoundError(f"{dataset_root!r} has no split folder named any of {list(candidates)}; "
                            f"its folders: {present}")


def _images_under(folder: str) -> list[str]:
    """Image files under ``folder`` as torchvision's ``make_dataset`` lists them (module docstring);
    symbolic links to folders are followed unless they lead back to a folder on the current walk."""
    on_walk = {folder: {os.path.realpath(folder)}}  # each visited folder -> real paths of it and its ancestors
    walked = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        ancestors = on_walk.pop(parent)
        keep = []
        for d in dirs:
            real = os.path.realpath(os.path.join(parent, d))
            if real not in ancestors:  # a link to a folder on the walk would loop forever
                keep.append(d)
                on_walk[os.path.join(parent, d)] = ancestors | {real}
        dirs[:] = keep
        walked.append((parent, files))
    return [os.path.join(parent, f) for parent, files in sorted(walked)
            for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]


def read_image_folder(root: str) -> ImageFolder:
    """Index ``root/<class>/**/<image>``; FileNotFoundError for a missing folder, ValueError for a
    folder without class sub-folders or a class folder without images (naming it)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    classes = tuple(sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class sub-folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = _images_under(os.path.join(root, name))
        if not found:
            raise ValueError(f"class folder {os.path.join(root, name)!r} holds no images "
                             f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
    return ImageFolder(root, classes, tuple(paths), np.asarray(labels, np.int32))


def resize_crop_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """torchvision ``Resize(size)`` + ``CenterCrop(size)`` geometry: the resized (w, h) and the crop
    box (left, top, right, bottom) in resized pixels."""
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return new, (left, top, left + size, top + size)


def load_clip_image(path: str, size: int) -> np.ndarray:
    """One image file -> uint8 [size, size, 3]: RGB, shorter side resized to ``size`` (bicubic),
    centre crop (module docstring). ValueError naming the file if PIL cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path!r}: {err}") from err
    new, box = resize_crop_box(image.width, image.height, size)
    if image.size != new:
        image = image.resize(new, Image.BICUBIC)
    return np.asarray(image.crop(box), np.uint8)


def decode_images(paths: Sequence[str], size: int, workers: int = 0) -> np.ndarray:
    """:func:`load_clip_image` of every path -> uint8 [N, size, size, 3], decoded by ``workers``
    threads (0: ``os.cpu_count()``)."""
    out = np.empty((len(paths), size, size, 3), np.uint8)
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(paths) or 1))) as pool:
        for i, image in enumerate(pool.map(lambda p: load_clip_image(p, size), paths)):
            out[i] = image
    return out


def cache_key(paths: Sequence[str], size: int) -> str:
    """16 hex digits naming the decoded cache of ``paths`` at ``size``: a hash of each path with its
    file's size and modification time (ns), so editing or replacing an image changes the key."""
    digest = hashlib.sha1(str(size).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cache_images(paths: Sequence[str], out_path: str, size: int, chunk: int = 512, workers: int = 0) -> np.ndarray:
    """Decode ``paths`` chunk by chunk into ``out_path`` (a ``.npy`` file, uint8 [N, size, size, 3])
    unless it exists with that shape; returns it opened read-only as a memory map. Written to a hidden
    temporary sibling, fsynced and renamed at the end; the temporary is removed when decoding fails
    (the error names the image). Name ``out_path`` by :func:`cache_key` so edited images are re-read."""
    shape = (len(paths), size, size, 3)
    if os.path.exists(out_path):
        cached = np.load(out_path, mmap_mode="r")
        if cached.shape == shape and cached.dtype == np.uint8:
            return cached
    folder, name = os.path.split(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for start in range(0, len(paths), chunk):
            array[start:start + chunk] = decode_images(paths[start:start + chunk], size, workers)
        array.flush()
        del array
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return np.load(out_path, mmap_mode="r")


class Batches:
    """Re-iterable fixed-size batches of an array [N, ...] (e.g. a memory-mapped cache) as device
    arrays [batch, ...], the last one zero-padded (one compile for every batch); ``len`` is the
    number of batches. The next batch is read on a host thread while the current one is used."""

    def __init__(self, array, batch: int):
        if batch <= 0:
            raise ValueError(f"batch size must be positive, got {batch}")
        self.array, self.batch = array, batch

    def __len__(self) -> int:
        return -(-len(self.array) // self.batch)

    def _host(self, i: int) -> np.ndarray:
        x = np.asarray(self.array[i * self.batch:(i + 1) * self.batch])
        pad = self.batch - len(x)
        return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x

    def __iter__(self) -> Iterator[jax.Array]:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._host, 0) if len(self) else None
            for i in range(len(self)):
                x = pending.result()
                if i + 1 < len(self):
                    pending = pool.submit(self._host, i + 1)
                yield jnp.asarray(x)


__all__ = ["Batches", "IMAGE_EXTENSIONS", "ImageFolder", "cache_images", "cache_key", "decode_images", "load_clip_image",
           "read_image_folder", "resize_crop_box", "split_folder"]
