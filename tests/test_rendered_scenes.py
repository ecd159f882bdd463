"""The rendered indoor-scene dataset: determinism, geometry checked independently of the renderer's own
hit points (back-projected depth against the scene's planes and spheres, finite-difference normals),
class balance, and the tfds cache."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from mtl_jax.data import rendered_scenes as R

H, W = 32, 48


def _scene_and_render(index, split="train", seed=0):
    scene = R.make_scene(seed, index, split)
    return scene, R.render(scene, H, W)


def _back_project(scene, depth):
    """Camera-frame and world points [H, W, 3] of a z-depth map, from the pinhole model (pixel centres,
    principal point at the image centre, focal = scene.focal * width), written out here from scratch."""
    h, w = depth.shape[:2]
    f = scene.focal * w
    v, u = np.mgrid[0:h, 0:w] + 0.5
    z = depth[..., 0].astype(np.float64)
    cam = np.stack([(u - w / 2) / f * z, -(v - h / 2) / f * z, -z], axis=-1)
    return cam, scene.camera + cam @ scene.rotation.T


def test_examples_are_pure_functions_of_seed_split_index():
    a, b = R.render_example(3, 7, "train", H, W), R.render_example(3, 7, "train", H, W)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], R.render_example(3, 8, "train", H, W)["image"])
    assert not np.array_equal(a["image"], R.render_example(3, 7, "test", H, W)["image"])
    assert not np.array_equal(a["image"], R.render_example(4, 7, "train", H, W)["image"])
    assert a["image"].dtype == np.uint8 and a["segmentation"].dtype == np.int8
    assert a["depth"].shape == (H, W, 1) and a["normal"].shape == (H, W, 3)


def test_floor_and_ceiling_pixels_back_project_onto_their_planes():
    checked = 0
    for i in range(6):
        scene, out = _scene_and_render(i)
        _, world = _back_project(scene, out["depth"])
        floor, ceiling = out["segmentation"] == R.FLOOR, out["segmentation"] == R.CEILING
        np.testing.assert_allclose(world[floor][:, 1], 0.0, atol=1e-4)
        np.testing.assert_allclose(world[ceiling][:, 1], scene.room[1], atol=1e-4)
        walls = out["segmentation"] == R.WALL
        on_wall = np.minimum.reduce([np.abs(world[walls][:, 0]), np.abs(world[walls][:, 0] - scene.room[0]),
                                     np.abs(world[walls][:, 2]), np.abs(world[walls][:, 2] - scene.room[2])])
        assert on_wall.max() < 1e-4
        checked += floor.sum()
    assert checked > 100


def test_sphere_normals_are_radial_and_every_normal_is_a_unit_vector_facing_the_camera():
    spheres = 0
    for i in range(12):
        scene, out = _scene_and_render(i)
        normal = out["normal"].astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=1e-5)
        cam, world = _back_project(scene, out["depth"])
        assert ((normal * cam).sum(-1) < 0).all()  # the surface faces the viewer
        assert (out["normal"].sum(-1) != 0).all()  # no valid normal reads as LibMTL's 'invalid'
        for k, object_id in enumerate(scene.sphere_id):
            mask = out["object"] == object_id
            if not mask.any():
                continue
            spheres += mask.sum()
            offset = world[mask] - scene.sphere_centre[k]
            np.testing.assert_allclose(np.linalg.norm(offset, axis=-1), scene.sphere_radius[k], atol=1e-4)
            world_normal = normal[mask] @ scene.rotation.T
            np.testing.assert_allclose(world_normal, offset / scene.sphere_radius[k], atol=1e-4)
            assert (out["segmentation"][mask] == R.BALL).all()
    assert spheres > 20


def test_depth_gradients_agree_with_the_normals_on_planar_regions():
    agreements = []
    for i in range(6):
        scene, out = _scene_and_render(i)
        cam, _ = _back_project(scene, out["depth"])
        ids, normal = out["object"], out["normal"].astype(np.float64)
        du = cam[1:-1, 2:] - cam[1:-1, :-2]
        dv = cam[2:, 1:-1] - cam[:-2, 1:-1]
        estimate = np.cross(du, dv)
        estimate /= np.linalg.norm(estimate, axis=-1, keepdims=True)
        centre = normal[1:-1, 1:-1]
        # planar, judged from the depth alone: 1 / z is affine in the pixel coordinates on a plane, so
        # its second differences vanish; and the 3x3 neighbourhood sees one object
        inverse = 1.0 / cam[..., 2]
        flat_u = np.abs(inverse[1:-1, 2:] - 2 * inverse[1:-1, 1:-1] + inverse[1:-1, :-2])
        flat_v = np.abs(inverse[2:, 1:-1] - 2 * inverse[1:-1, 1:-1] + inverse[:-2, 1:-1])
        same = (flat_u < 1e-6 * np.abs(inverse[1:-1, 1:-1])) & (flat_v < 1e-6 * np.abs(inverse[1:-1, 1:-1]))
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                same &= ids[dy:dy + H - 2, dx:dx + W - 2] == ids[1:-1, 1:-1]
        agreements.append(np.abs((estimate * centre).sum(-1))[same])
    agreement = np.concatenate(agreements)
    assert len(agreement) > 1000
    assert agreement.min() > 0.9999


def test_class_balance_is_not_degenerate():
    labels = np.stack([R.render(R.make_scene(0, i), 16, 24)["segmentation"] for i in range(120)])
    shares = R.class_frequencies(labels)
    assert set(shares) == set(R.CLASSES) and len(R.CLASSES) == 13
    assert min(shares.values()) > 0.002, shares
    assert max(shares.values()) < 0.6, shares
    present = np.array([[(image == k).any() for k in range(13)] for image in labels]).mean(0)
    assert present.min() > 0.05, dict(zip(R.CLASSES, present))


def test_the_builder_caches_and_records_follow_the_dense_interface(tmp_path, monkeypatch):
    cfg = ConfigDict(dict(name="rendered_scenes", num_train=3, num_test=2, seed=5, data_dir=str(tmp_path),
                          height=32, width=32))
    dataset = R.load_rendered_scenes(cfg)
    assert [t.name for t in dataset.tasks] == ["segmentation", "depth", "normal"]
    assert [t.kind for t in dataset.tasks] == ["segmentation", "depth", "normal"]
    assert dataset.tasks[0].num_outputs == 13
    assert {s: len(src) for s, src in dataset.splits.items()} == {"train": 3, "test": 2}
    # tfds stores the examples in its own (fixed) order: match each record to the rendered example
    stored = sorted(dataset.splits["test"].__getitems__([0, 1]), key=lambda r: float(r["depth"].sum()))
    rendered = sorted((R.render_example(5, i, "test", 32, 32) for i in range(2)), key=lambda r: float(r["depth"].sum()))
    for record, expected in zip(stored, rendered):
        assert record["image"].dtype == np.float32 and record["segmentation"].dtype == np.int64
        np.testing.assert_allclose(record["image"], expected["image"] / 255.0, atol=1e-7)
        np.testing.assert_array_equal(record["segmentation"], expected["segmentation"])
        np.testing.assert_array_equal(record["depth"], expected["depth"])
        np.testing.assert_array_equal(record["normal"], expected["normal"])
    # a second load reads the prepared files: rendering again would raise
    monkeypatch.setattr(R, "make_rendered_scenes", lambda *a, **k: pytest.fail("rendered again"))
    again = R.load_rendered_scenes(cfg)
    np.testing.assert_array_equal(again.splits["train"][2]["normal"], dataset.splits["train"][2]["normal"])
    batch = again.splits["train"].__getitems__([0, 2])
    assert len(batch) == 2 and batch[1]["image"].shape == (32, 32, 3)


def test_bad_options_are_refused_naming_the_key(tmp_path):
    cfg = ConfigDict(dict(name="rendered_scenes", num_train=3, num_test=2, seed=0, data_dir=str(tmp_path),
                          height=4, width=32))
    with pytest.raises(ValueError, match="data.height"):
        R.load_rendered_scenes(cfg)


def test_registered_as_a_dataset():
    from mtl_jax.data.datasets import DATASETS, dataset_options

    assert DATASETS["rendered_scenes"]["load"] is R.load_rendered_scenes
    assert dataset_options("rendered_scenes")[0] == R.OPTIONS
