"""Loaders of the standard MTL benchmarks (NYUv2, Cityscapes, CelebA, QM9, Office-31 / Office-Home) on
tiny copies written in their exact on-disk formats (tests/fixtures/standard), and every bad input of
issue 30 (missing file, wrong shape / dtype, out-of-range label) failing in one line naming the file."""

import os
import sys

import numpy as np
import pytest

from fixtures.standard import celeba_files, mtan_files as mtan, office_files, qm9_files
from mtl_jax.config import UsageError, apply_overrides, check_config, default_config
from mtl_jax.data import get_dataset, graphs, mtan_npy, office, qm9
from mtl_jax.data.sources import read_all


def data_config(tmp_path, name, manual_dir, **options):
    cfg = default_config().data
    cfg.update(dict(name=name, data_dir=str(tmp_path / "tfds"), cache_in_memory=False, manual_dir=str(manual_dir),
                    **options))
    return cfg


def one_line_error(kind, match, fn, *args, **kwargs):
    """Runs ``fn(*args, **kwargs)`` expecting ``kind`` whose message matches ``match`` and is one line."""
    with pytest.raises(kind, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)


# ---------------------------------------------------------------- NYUv2 / Cityscapes (MTAN npy)

def test_nyuv2_records_are_the_npy_files(tmp_path):
    root = mtan.write_nyuv2(tmp_path / "nyuv2", dtype=np.float64)
    ds = get_dataset(data_config(tmp_path, "nyuv2", root, height=12, width=16))
    assert [(t.name, t.kind, t.num_outputs) for t in ds.tasks] == [
        ("segmentation", "segmentation", 13), ("depth", "depth", 1), ("normal", "normal", 3)]
    assert {split: len(source) for split, source in ds.splits.items()} == {"train": 3, "test": 2}
    for split, folder in (("train", "train"), ("test", "val")):
        arrays = read_all(ds.splits[split])
        assert arrays["image"].dtype == np.float32 and arrays["image"].shape == (len(arrays["image"]), 12, 16, 3)
        assert arrays["segmentation"].dtype == np.int64 and arrays["segmentation"].shape[1:] == (12, 16)
        assert arrays["depth"].shape[1:] == (12, 16, 1) and arrays["normal"].shape[1:] == (12, 16, 3)
        for i in range(len(arrays["image"])):  # record i = N.npy with N = i, in order
            for key, name in (("image", "image"), ("segmentation", "label"), ("depth", "depth"), ("normal", "normal")):
                on_disk = np.load(os.path.join(root, folder, name, f"{i}.npy"))
                np.testing.assert_array_equal(arrays[key][i], on_disk.astype(arrays[key].dtype))
        assert (arrays["segmentation"] == -1).any() and arrays["segmentation"].max() < 13


def test_cityscapes_7_or_19_classes_and_libmtl_label_folder(tmp_path):
    root = mtan.write_cityscapes(tmp_path / "city", height=8, width=16)
    for classes, folder in ((7, "label_7"), (19, "label_19")):
        ds = get_dataset(data_config(tmp_path, "cityscapes", root, num_classes=classes, height=8, width=16))
        assert [(t.name, t.num_outputs) for t in ds.tasks] == [("segmentation", classes), ("depth", 1)]
        seg = read_all(ds.splits["test"])["segmentation"]
        np.testing.assert_array_equal(seg[1], np.load(os.path.join(root, "val", folder, "1.npy")))
    # LibMTL's cityscapes2 copy: the 7-class labels in label/
    libmtl = mtan.write_cityscapes(tmp_path / "city2", folders=("image", "label", "depth"), height=8, width=16,
                                   label_classes=7)
    ds = get_dataset(data_config(tmp_path, "cityscapes", libmtl, height=8, width=16))
    np.testing.assert_array_equal(read_all(ds.splits["train"])["segmentation"][2],
                                  np.load(os.path.join(libmtl, "train", "label", "2.npy")))
    with pytest.raises(UsageError, match=r"data.num_classes.*unknown Cityscapes class count 5"):
        check_config(apply_overrides(default_config(), ["data.name='cityscapes'", "data.num_classes=5"]))


def test_mtan_bad_inputs_fail_in_one_line_naming_the_file(tmp_path):
    def load(root, **options):
        return get_dataset(data_config(tmp_path, "nyuv2", root, height=12, width=16, **options))

    one_line_error(ValueError, r"set data.manual_dir", get_dataset,
                   data_config(tmp_path, "nyuv2", "", height=12, width=16))
    one_line_error(FileNotFoundError, r"directory .*nowhere does not exist", load, tmp_path / "nowhere")
    root = mtan.write_nyuv2(tmp_path / "a")
    os.remove(os.path.join(root, "val", "depth", "1.npy"))
    one_line_error(FileNotFoundError, r"val/depth/1.npy does not exist", load, root)
    root = mtan.write_nyuv2(tmp_path / "b")
    os.rename(os.path.join(root, "train", "image", "2.npy"), os.path.join(root, "train", "image", "7.npy"))
    one_line_error(ValueError, r"image/7.npy: the 3 image files must be named 0.npy .. 2.npy", load, root)
    root = mtan.write_nyuv2(tmp_path / "c")
    np.save(os.path.join(root, "train", "normal", "1.npy"), np.zeros((12, 16), np.float32))
    one_line_error(ValueError, r"train/normal/1.npy: array of shape \(12, 16\) and dtype float32, expected shape "
                               r"\(12, 16, 3\)", load, root)
    one_line_error(ValueError, r"train/image/0.npy: array of shape \(12, 16, 3\).*expected shape \(288, 384, 3\)",
                   get_dataset, data_config(tmp_path, "nyuv2", root))
    root = mtan.write_nyuv2(tmp_path / "d")
    np.save(os.path.join(root, "val", "image", "0.npy"), np.zeros((12, 16, 3), np.uint8))
    one_line_error(ValueError, r"val/image/0.npy: .*dtype uint8, expected shape \(12, 16, 3\) and a float dtype",
                   load, root)
    root = mtan.write_nyuv2(tmp_path / "e")
    label = np.load(os.path.join(root, "train", "label", "2.npy"))
    label[3, 3], label[4, 4] = 13, -2
    np.save(os.path.join(root, "train", "label", "2.npy"), label)
    one_line_error(ValueError, r"train/label/2.npy: labels \[-2.0, 13.0\] outside the 13 classes \(valid: 0..12 or "
                               r"-1 \(ignore\)\)", load, root)
    label[3, 3], label[4, 4] = 0.5, 0
    np.save(os.path.join(root, "train", "label", "2.npy"), label)
    one_line_error(ValueError, r"train/label/2.npy: labels \[0.5\] outside", load, root)
    np.save(os.path.join(root, "train", "label", "2.npy"), np.array([object()] * 4, dtype=object), allow_pickle=True)
    one_line_error(ValueError, r"train/label/2.npy: not a numeric .npy array", load, root)


def test_unreadable_npy_files_fail_in_one_line_naming_the_file(tmp_path):
    """An empty file (an interrupted copy), a truncated one and an .npz archive under a .npy name."""
    from mtl_jax.data.manual_dir import load_npy

    empty, truncated, archive = (str(tmp_path / name) for name in ("empty.npy", "truncated.npy", "archive.npy"))
    open(empty, "wb").close()
    np.save(truncated, np.zeros((8, 8), np.float32))
    with open(truncated, "r+b") as f:
        f.truncate(60)
    with open(archive, "wb") as f:
        np.savez(f, x=np.zeros(3))
    one_line_error(ValueError, r"empty.npy: not a numeric .npy array \(EOFError", load_npy, empty)
    one_line_error(ValueError, r"truncated.npy: not a numeric .npy array", load_npy, truncated)
    one_line_error(ValueError, r"archive.npy: an .npz archive, not a .npy array", load_npy, archive)


def test_augment_is_mtans_random_scale_crop_and_flip():
    class Draws:  # a np.random.Generator stand-in returning chosen draws
        def __init__(self, ints, uniform):
            self.ints, self.uniform = list(ints), uniform

        def integers(self, n):
            value = self.ints.pop(0)
            assert 0 <= value < n
            return value

        def random(self):
            return self.uniform

    rng = np.random.default_rng(0)
    image = rng.random((4, 6, 3)).astype(np.float32)
    normal = rng.standard_normal((4, 6, 3)).astype(np.float32)
    seg = np.arange(24).reshape(4, 6) % 13
    depth = rng.random((4, 6, 1)).astype(np.float32)
    record = {"image": image, "segmentation": seg, "depth": depth, "normal": normal}
    # scale index 0 (1.0): the whole image, unchanged; no flip (uniform draw >= 0.5)
    same = mtan_npy.augment(record, Draws([0, 0, 0], 0.7))
    for key in record:
        np.testing.assert_array_equal(same[key], record[key])
    # scale 2.0: crop rows 1..2, cols 3..5 (int(4 / 2) x int(6 / 2)) resized back: nearest doubles each pixel
    out = mtan_npy.random_scale_crop(record, Draws([0, 1, 3], 0.0), scales=(2.0,))
    np.testing.assert_array_equal(out["segmentation"], np.repeat(np.repeat(seg[1:3, 3:6], 2, 0), 2, 1))
    np.testing.assert_array_equal(out["depth"], np.repeat(np.repeat(depth[1:3, 3:6], 2, 0), 2, 1) / 2)
    # bilinear, align_corners=True: corners are the crop's corners, (2 - 1) / (4 - 1) of the way between rows
    np.testing.assert_allclose(out["image"][[0, 0, -1, -1], [0, -1, 0, -1]], image[[1, 1, 2, 2], [3, 5, 3, 5]])
    np.testing.assert_allclose(out["image"][1, 0], image[1, 3] * 2 / 3 + image[2, 3] / 3, rtol=1e-6)
    flipped = mtan_npy.random_flip(record, Draws([], 0.2))
    np.testing.assert_array_equal(flipped["segmentation"], seg[:, ::-1])
    np.testing.assert_array_equal(flipped["normal"], normal[:, ::-1] * np.array([-1, 1, 1], np.float32))


def test_augment_option_reaches_the_training_stream_only(tmp_path):
    """data.augment=True: the training stream applies mtan_npy.augment, deterministically per seed and
    position; evaluation batches read the files unchanged."""
    from mtl_jax.data.pipeline import eval_batches, train_dataset

    root = mtan.write_nyuv2(tmp_path / "nyuv2", dtype=np.float32)
    plain = get_dataset(data_config(tmp_path, "nyuv2", root, height=12, width=16))
    augmented = get_dataset(data_config(tmp_path, "nyuv2", root, height=12, width=16, augment=True))
    assert plain.augment is None and augmented.augment is mtan_npy.augment
    keys = ["image", "segmentation", "depth", "normal"]
    stream = lambda ds, seed: train_dataset(ds.splits["train"], keys=keys, global_batch_size=3, seed=seed,
                                            augment=ds.augment)
    first = [stream(augmented, 0)[i] for i in range(4)]
    again = [stream(augmented, 0)[i] for i in range(4)]
    unaugmented = [stream(plain, 0)[i] for i in range(4)]
    for a, b in zip(first, again):
        for key in keys:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a["image"], u["image"]) for a, u in zip(first, unaugmented))
    assert all(a[k].shape == u[k].shape and a[k].dtype == u[k].dtype for a, u in zip(first, unaugmented) for k in keys)
    evaluated = next(eval_batches(augmented.splits["test"], keys=keys, global_batch_size=2))
    np.testing.assert_array_equal(evaluated["image"], read_all(plain.splits["test"])["image"][:2])


@pytest.mark.parametrize("task", ["depth", "normal"])
def test_augmented_single_task_stream_is_the_full_streams_task(tmp_path, task):
    """A single-task baseline (data.tasks) with data.augment: the training records lack the other
    tasks' keys, and the task's augmented arrays are those of the full record under the same draws."""
    from mtl_jax.data.pipeline import train_dataset

    root = mtan.write_nyuv2(tmp_path / "nyuv2", dtype=np.float32)
    options = dict(height=12, width=16, augment=True)
    full = get_dataset(data_config(tmp_path, "nyuv2", root, **options))
    single = get_dataset(data_config(tmp_path, "nyuv2", root, tasks=(task,), **options))
    stream = lambda ds, keys: train_dataset(ds.splits["train"], keys=keys, global_batch_size=3, seed=1,
                                            augment=ds.augment)
    for i in range(3):
        one = stream(single, ["image", task])[i]
        every = stream(full, ["image", "segmentation", "depth", "normal"])[i]
        assert sorted(one) == sorted(["image", task])
        for key in ("image", task):
            np.testing.assert_array_equal(one[key], every[key])


# ---------------------------------------------------------------- CelebA

@pytest.mark.parametrize("official_layout", [False, True])
def test_celeba_records_and_splits(tmp_path, official_layout):
    from PIL import Image

    root, labels, files = celeba_files.write_celeba(tmp_path / "celeba", official_layout=official_layout)
    ds = get_dataset(data_config(tmp_path, "celeba", root))
    assert [t.name for t in ds.tasks] == celeba_files.ATTRIBUTES
    assert {(t.kind, t.num_outputs, t.loss, t.metrics[0]) for t in ds.tasks} == {
        ("classification", 1, "binary_cross_entropy", "f1")}
    assert {split: len(source) for split, source in ds.splits.items()} == {"train": 3, "validation": 1, "test": 2}
    test = read_all(ds.splits["test"])  # images 5 and 6 (partition 2)
    assert test["image"].dtype == np.float32 and test["image"].shape == (2, 64, 64, 3)
    for k, name in enumerate(celeba_files.ATTRIBUTES):
        np.testing.assert_array_equal(test[name], (labels[4:6, k] == 1).astype(np.int64))
    folder = os.path.join(root, "Img" if official_layout else "", "img_align_celeba")
    with Image.open(os.path.join(folder, files[5])) as img:  # FAMO: Resize((64, 64)) + ToTensor
        expected = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(test["image"][1], expected, atol=1e-7)


def test_celeba_bad_inputs_fail_in_one_line(tmp_path):
    root, _, _ = celeba_files.write_celeba(tmp_path / "a")
    load = lambda: get_dataset(data_config(tmp_path, "celeba", root, image_size=8))  # noqa: E731
    attr = os.path.join(root, "list_attr_celeba.txt")
    text = open(attr).read()
    with open(attr, "w") as f:
        f.write(text.replace(" 1", " 0", 1))
    one_line_error(ValueError, r"list_attr_celeba.txt: line 3 must be a file name and 40 values 1 / -1", load)
    with open(attr, "w") as f:
        f.write("7" + text[1:])
    one_line_error(ValueError, r"list_attr_celeba.txt: line 1 says 7 images, the file lists 6", load)
    os.remove(attr)
    one_line_error(FileNotFoundError, r"CelebA: file .*list_attr_celeba.txt does not exist", load)
    root, _, _ = celeba_files.write_celeba(tmp_path / "b")
    os.remove(os.path.join(root, "img_align_celeba", "000004.jpg"))
    one_line_error(FileNotFoundError, r"image: file .*000004.jpg does not exist", lambda: get_dataset(
        data_config(tmp_path, "celeba", root, image_size=8)))


# ---------------------------------------------------------------- QM9

def qm9_config(tmp_path, root, **options):
    return data_config(tmp_path, "qm9", root, num_test=2, num_validation=2, **options)


def test_qm9_methane_features_and_targets_in_pyg_units(tmp_path):
    root, rows = qm9_files.write_qm9(tmp_path / "qm9")
    cfg = qm9_config(tmp_path, root)
    ds = get_dataset(cfg)
    assert [t.name for t in ds.tasks] == ["mu", "alpha", "homo", "lumo", "r2", "zpve", "U0_atom", "U_atom",
                                          "H_atom", "G_atom", "Cv"]
    assert {split: len(source) for split, source in ds.splits.items()} == {"train": 4, "validation": 2, "test": 2}
    stats = qm9.target_stats(cfg)
    found = []
    for split, source in ds.splits.items():
        arrays = read_all(source)
        graph = graphs.unpack_graph(arrays["graph"])
        assert arrays["graph"].shape[1:] == (29, 131)
        for i in range(len(source)):
            n = int(graph.node_mask[i].sum())
            found.append(n)
            if n == 5 and graph.nodes[i, :5, 0].sum() == 4:  # methane: C and four H (fluoromethane has 3 H)
                methane = (graph, i, {t.name: arrays[t.name][i] for t in ds.tasks}, split)
    # atoms of CH4, NH3, HCN, H2CO, ethanol, benzene, CH3F, acetamide: water (1-based 3) is uncharacterized
    assert sorted(found) == sorted([5, 4, 3, 4, 9, 12, 5, 9])
    graph, i, targets, split = methane
    carbon = [0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 4]  # one-hot C, Z, aromatic / sp / sp2 / sp3 0 (unsanitised), 4 H
    hydrogen = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(graph.nodes[i, :5], [carbon] + [hydrogen] * 4)
    np.testing.assert_array_equal(graph.bonds[i, 0, 1:5], [[1, 0, 0, 0]] * 4)  # C-H single bonds
    assert graph.bonds[i].sum() == 8 and graph.node_mask[i, 5:].sum() == 0
    sdf_lines = open(os.path.join(root, "gdb9.sdf")).read().split("\n")
    coords = [[float(v) for v in line.split()[:3]] for line in sdf_lines[4:9]]
    np.testing.assert_allclose(graph.positions[i, :5], coords, atol=1e-6)
    # gdb_1's csv row, by hand in PyG's units: Hartree -> eV (27.211386246), kcal/mol -> eV (0.04336414)
    expected = {"mu": 0.0, "alpha": 13.21, "homo": -0.3877 * 27.211386246, "lumo": 0.1171 * 27.211386246,
                "r2": 35.3641, "zpve": 0.044749 * 27.211386246, "U0_atom": -395.999594594 * 0.04336414,
                "U_atom": -398.643290011 * 0.04336414, "H_atom": -401.014646522 * 0.04336414,
                "G_atom": -372.471772148 * 0.04336414, "Cv": 6.469}
    for k, name in enumerate(qm9.TASK_NAMES):
        assert targets[name].shape == (1,) and targets[name].dtype == np.float32
        original = targets[name][0] * stats.std[k] + stats.mean[k]
        np.testing.assert_allclose(original, expected[name], rtol=1e-5, atol=1e-5)
    # the statistics are the train split's (unbiased std); 'all' uses every kept molecule
    train_z = np.concatenate([read_all(ds.splits["train"])[n] for n in qm9.TASK_NAMES], axis=1)
    np.testing.assert_allclose(train_z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train_z.std(0, ddof=1), 1, atol=1e-5)
    every = qm9.target_stats(qm9_config(tmp_path, root, target_stats="all"))
    kept = np.delete(qm9.read_targets(os.path.join(root, "gdb9.sdf.csv")), 2, axis=0)[:, list(qm9.TARGET_IDX)]
    np.testing.assert_allclose(every.mean, kept.mean(0))


def test_qm9_bonds_split_and_bad_inputs(tmp_path):
    root, _ = qm9_files.write_qm9(tmp_path / "qm9", skip=())
    ds = get_dataset(qm9_config(tmp_path, root, split_seed=3))
    graph = graphs.unpack_graph(np.concatenate([read_all(s)["graph"] for s in ds.splits.values()]))
    types = graph.bonds.sum((1, 2)) / 2  # bonds per molecule by type
    assert sorted(map(tuple, types.astype(int).tolist())) == sorted([
        (4, 0, 0, 0), (3, 0, 0, 0), (2, 0, 0, 0), (1, 0, 1, 0), (2, 1, 0, 0), (8, 0, 0, 0), (9, 3, 0, 0),
        (4, 0, 0, 0), (7, 1, 0, 0)])  # benzene kekulised: 3 single C-C + 6 C-H, 3 double; no aromatic bond
    assert graph.nodes[..., 6:10].sum() == 0  # no aromatic / hybridisation flags without sanitisation (PyG)
    kept = np.arange(9)
    assert {k: v.tolist() for k, v in qm9.qm9_split(kept, 3, 2, 2).items()} == {
        k: v.tolist() for k, v in qm9.qm9_split(kept, 3, 2, 2).items()}
    split = qm9.qm9_split(kept, 3, 2, 2)
    assert sorted(np.concatenate(list(split.values())).tolist()) == kept.tolist() and len(split["train"]) == 5
    one_line_error(ValueError, r"9 molecules cannot hold num_test=5 \+ num_validation=4", get_dataset,
                   data_config(tmp_path, "qm9", root, num_test=5, num_validation=4))
    one_line_error(ValueError, r"data.num_test \(0\) and data.num_validation \(2\) must be >= 1", get_dataset,
                   data_config(tmp_path, "qm9", root, num_test=0, num_validation=2))
    csv = os.path.join(root, "gdb9.sdf.csv")
    lines = open(csv).read().split("\n")
    with open(csv, "w") as f:
        f.write("\n".join(lines[:4] + [lines[4].replace(",", ";", 3)] + lines[5:]))
    one_line_error(ValueError, r"gdb9.sdf.csv: line 5 must be mol_id and 19 numbers", get_dataset,
                   qm9_config(tmp_path, root))
    with open(csv, "w") as f:
        f.write("\n".join(lines[:6]))
    one_line_error(ValueError, r"gdb9.sdf.csv: 5 rows for the 9 molecules of .*gdb9.sdf", get_dataset,
                   qm9_config(tmp_path, root))
    os.remove(os.path.join(root, "gdb9.sdf"))
    one_line_error(FileNotFoundError, r"QM9: file .*gdb9.sdf does not exist", get_dataset, qm9_config(tmp_path, root))


def test_qm9_without_rdkit_names_the_install(tmp_path, monkeypatch):
    root, _ = qm9_files.write_qm9(tmp_path / "qm9")
    monkeypatch.setitem(sys.modules, "rdkit", None)
    one_line_error(ImportError, r"pip install rdkit", get_dataset, qm9_config(tmp_path, root))


# ---------------------------------------------------------------- Office-31 / Office-Home

def test_office31_with_libmtl_lists(tmp_path):
    from PIL import Image

    root, written = office_files.write_office(tmp_path / "office31", classes=(0, 5, 30), per_class=2)
    lists = office_files.write_lists(tmp_path / "lists", written)
    ds = get_dataset(data_config(tmp_path, "office31", root, image_size=16, split_lists=str(tmp_path / "lists")))
    assert [(t.name, t.num_outputs) for t in ds.tasks] == [("amazon", 31), ("dslr", 31), ("webcam", 31)]
    for split, suffix in (("train", "train"), ("validation", "val"), ("test", "test")):
        arrays = read_all(ds.splits[split])
        rows = [(d, path, label) for d in ("amazon", "dslr", "webcam") for path, label in lists[d][suffix]]
        assert len(arrays["image"]) == len(rows) and arrays["image"].shape[1:] == (16, 16, 3)
        for i, (domain, path, label) in enumerate(rows):  # domain after domain, list order; -1 for other domains
            assert {d: int(arrays[d][i]) for d in ("amazon", "dslr", "webcam")} == {
                d: label if d == domain else -1 for d in ("amazon", "dslr", "webcam")}
        with Image.open(os.path.join(root, rows[-1][1])) as img:  # Resize((S, S)), ToTensor, ImageNet Normalize
            pixels = np.asarray(img.convert("RGB").resize((16, 16), Image.BILINEAR), np.float32) / 255
        np.testing.assert_allclose(arrays["image"][-1], (pixels - office.IMAGENET_MEAN) / office.IMAGENET_STD,
                                   atol=1e-5)


def test_office_home_folders_without_lists(tmp_path):
    root, written = office_files.write_office(tmp_path / "home", "office_home", classes=(0, 64), per_class=5)
    os.rename(os.path.join(root, "Real_World"), os.path.join(root, "Real World"))  # the archive's folder name
    ds = get_dataset(data_config(tmp_path, "office_home", root, image_size=8))
    assert [t.name for t in ds.tasks] == ["Art", "Clipart", "Product", "Real_World"]
    sizes = {split: len(source) for split, source in ds.splits.items()}
    assert sizes == {"train": 4 * 6, "validation": 4 * 2, "test": 4 * 2}  # 60 / 20 / 20 of 10 per domain
    labels = np.concatenate([read_all(s)["Real_World"] for s in ds.splits.values()])
    assert sorted(labels[labels >= 0].tolist()) == [0] * 5 + [64] * 5  # LibMTL's ids: Calendar 0, Trash_Can 64


def test_office_bad_inputs_fail_in_one_line(tmp_path):
    root, written = office_files.write_office(tmp_path / "o", classes=(1,), per_class=5)
    lists = str(tmp_path / "lists")
    office_files.write_lists(lists, written)
    load = lambda **kw: get_dataset(data_config(tmp_path, "office31", root, image_size=8, **kw))  # noqa: E731
    path = os.path.join(lists, "dslr_val.txt")
    with open(path, "a") as f:
        f.write("dslr/images/paper_notebook/x.jpg 31\n")
    one_line_error(ValueError, r"dslr_val.txt: line 2: label 31 outside the 31 classes", load, split_lists=lists)
    os.remove(path)
    one_line_error(FileNotFoundError, r"Office split list: file .*dslr_val.txt does not exist", load, split_lists=lists)
    os.remove(os.path.join(root, written["webcam"][0][0]))
    os.makedirs(os.path.join(root, "amazon", "images", "sofa"))
    one_line_error(ValueError, r"amazon/images: class folders \['sofa'\] are not classes", load)
    os.rmdir(os.path.join(root, "amazon", "images", "sofa"))
    office_files.write_lists(lists, written)
    one_line_error(FileNotFoundError, r"image: file .*webcam/images/paper_notebook/frame_0000.jpg does not exist",
                   load, split_lists=lists)
