"""The CLIP 8-task merging suite end to end on generated fixtures: tiny image folders and random
tiny CLIP checkpoints in both layouts (open_clip names with fused QKV; Hugging Face names, image
encoders without the projection as FusionBench's ``CLIPVisionModel``). The fixtures' labels are
each fine-tuned encoder's own predictions, so individual accuracy is 100%; task arithmetic's grid is
lambda = 0, so its row must equal the zero-shot row. Also: zero-shot heads against a prompt-by-prompt
hand computation, class names from folders, the image reader's geometry and errors, task_vectors'
``model.`` key prefix, a fixtures folder that is not ours (or of other settings) refused untouched."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.merging import clip_suite
from mtl_jax.checkpoints import read_checkpoint, write_safetensors
from mtl_jax.data.image_folder import load_clip_image, read_image_folder, resize_crop_box, split_folder
from mtl_jax.config import config_from_file
from mtl_jax.merging import zero_shot as zs
from mtl_jax.models.pretrained.clip import CLIPTextEncoder, load_clip

TASKS = ("eurosat", "gtsrb")
METHODS = {"open_clip": ("Task arithmetic", "TIES", "EMR"), "hf": ("AdaMerging (layer-wise)", "Fisher", "TALL-mask retrieval")}


def _config(root: str, layout: str):
    c = config_from_file(f"{clip_suite.CONFIG}:smoke,layout={layout}")
    fixtures = os.path.join(root, "fixtures")
    c.tasks = TASKS
    c.methods = METHODS[layout]
    c.fixtures.dir = fixtures
    c.pretrained = os.path.join(fixtures, "pretrained.safetensors")
    c.tokenizer = os.path.join(fixtures, "tokenizer.json")
    c.data_root = os.path.join(fixtures, "data")
    for t in c.finetuned:
        c.finetuned[t] = os.path.join(fixtures, "finetuned", f"{t}.safetensors")
    c.cache_dir = os.path.join(root, "cache")
    c.out = os.path.join(root, "out", "table")
    c.workers = 1
    c.merge.stats_chunk = 4  # 8 statistics images: two Fisher / RegMean chunks
    c.merge.ta_lambdas = (0.0,)  # task arithmetic at lambda 0 is the pretrained encoder
    return c


@pytest.fixture(scope="module", params=["open_clip", "hf"])
def suite(request, tmp_path_factory):
    config = _config(str(tmp_path_factory.mktemp(f"clip_suite_{request.param}")), request.param)
    return config, clip_suite.run_suite(config)


def test_table_is_written_and_rows_agree(suite):
    config, result = suite
    rows = result["rows"]
    assert list(rows)[:2] == list(clip_suite.BASELINES) and set(rows) == set(clip_suite.BASELINES) | set(config.methods)
    individual = np.array(rows["Individual (fine-tuned)"]["acc"])
    np.testing.assert_array_equal(individual, 1.0)  # labels = own predictions
    for name, row in rows.items():
        assert len(row["acc"]) == len(TASKS) and all(0.0 <= a <= 1.0 for a in row["acc"]), name
        np.testing.assert_allclose(row["normalised"], np.array(row["acc"]) / individual, err_msg=name)
    if "Task arithmetic" in rows:  # the merged encoder is the pretrained one: same predictions, same accuracy
        assert rows["Task arithmetic"]["hparams"] == {"lam": 0.0}
        assert rows["Task arithmetic"]["acc"] == rows["Pretrained (zero-shot)"]["acc"]
    text = open(config.out + ".md").read()
    assert "| method | EuroSAT | GTSRB | avg | paper avg |" in text and "| Individual (fine-tuned) | 100.0 | 100.0 |" in text
    published = clip_suite.FUSIONBENCH["Task arithmetic"][0]
    assert "Published numbers" in text and f"| Task arithmetic (FusionBench) | {published:.1f} |" in text
    stored = json.load(open(config.out + ".json"))
    assert stored["rows"]["Individual (fine-tuned)"]["acc"] == [1.0, 1.0]
    assert stored["test_sizes"] == [len(read_image_folder(os.path.join(config.data_root, t, "test")).paths) for t in TASKS]


def test_zero_shot_head_equals_a_prompt_by_prompt_computation(suite):
    config, _ = suite
    cfg = clip_suite.clip_config(config)
    _, params = load_clip(config.pretrained, config.layout, cfg)
    folders = read_image_folder(os.path.join(config.data_root, "eurosat", "train")).classes
    names = zs.class_names("eurosat", folders)
    assert names == ["annual crop land", "forest", "brushland or shrubland"]
    tokenizer = zs.CLIPTokenizer(config.tokenizer, cfg.text.context_length)
    got = zs.zero_shot_weights(cfg.text, params["text"], tokenizer, zs.prompts("eurosat", names))
    expected = []
    for name in names:
        units = []
        for template in zs.TEMPLATES["eurosat"]:
            ids = tokenizer([template.format(name)])
            assert ids[0, 0] == tokenizer.sot_id and tokenizer.eot_id in ids[0]
            e = np.asarray(CLIPTextEncoder(cfg.text).apply({"params": params["text"]}, jnp.asarray(ids)))[0]
            units.append(e / np.linalg.norm(e))
        mean = np.mean(units, axis=0)
        expected.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(got, np.array(expected), atol=1e-5)
    head = zs.classification_head(got, params["logit_scale"])
    np.testing.assert_allclose(head["out"]["kernel"], np.exp(float(params["logit_scale"])) * got.T, rtol=1e-6)


def test_class_names_from_folders():
    assert zs.class_names("sun397", ["a_abbey", "b_bakery_shop"]) == ["abbey", "bakery shop"]
    assert zs.class_names("gtsrb", ["00014"]) == ["stop"]
    assert zs.class_names("resisc45", ["sea_ice"], {"sea_ice": "ice"}) == ["ice"]
    assert [len(zs.TEMPLATES[d]) for d in zs.DATASETS] == [2, 8, 18, 3, 1, 3, 1, 8]
    with pytest.raises(ValueError, match="unknown CLIP benchmark dataset"):
        zs.class_name("imagenet", "x")


def test_image_folder_geometry_and_errors(tmp_path):
    from PIL import Image

    assert resize_crop_box(40, 48, 32) == ((32, 38), (0, 3, 32, 35))  # torchvision Resize(32) + CenterCrop(32)
    assert resize_crop_box(50, 32, 32) == ((50, 32), (9, 0, 41, 32))
    root = tmp_path / "ds"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "dog").mkdir()
    Image.fromarray(np.full((48, 40, 3), 7, np.uint8)).save(root / "train" / "cat" / "a.png")
    image = load_clip_image(str(root / "train" / "cat" / "a.png"), 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and np.all(image == 7)
    with pytest.raises(ValueError, match="dog.*holds no images"):
        read_image_folder(str(root / "train"))
    with pytest.raises(FileNotFoundError, match="no split folder named any of"):
        split_folder(str(root), ("test", "val"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_folder(str(root / "missing"))


def test_task_vectors_prefixed_encoder_loads(suite, tmp_path):
    config, _ = suite
    cfg = clip_suite.clip_config(config)
    _, params = load_clip(config.pretrained, config.layout, cfg)
    state = read_checkpoint(config.finetuned["eurosat"])
    path = str(tmp_path / "prefixed.safetensors")
    write_safetensors(path, {"model." + k: v for k, v in state.items()})
    plain = clip_suite.load_image_encoder(config.finetuned["eurosat"], cfg, config.layout, params["visual"])
    prefixed = clip_suite.load_image_encoder(path, cfg, config.layout, params["visual"])
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(prefixed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_errors_come_before_any_checkpoint_is_read(tmp_path):
    c = config_from_file(f"{clip_suite.CONFIG}:smoke")
    c.pretrained = str(tmp_path / "absent.safetensors")
    c.tasks = ("eurosat", "imagenet")
    with pytest.raises(ValueError, match=r"no checkpoint for tasks \['imagenet'\]"):
        clip_suite.load_models(c)
    assert "finetuned_layout" not in c  # one layout for every checkpoint: ``layout``


def test_fixtures_never_write_into_a_folder_that_is_not_theirs(suite, tmp_path):
    config, _ = suite
    real = tmp_path / "checkpoints"
    real.mkdir()
    (real / "pretrained.safetensors").write_bytes(b"the user's weights")
    with pytest.raises(ValueError, match=f"fixtures.dir '{real}' holds files but no fixtures.json"):
        clip_suite.make_fixtures(str(real), config.layout, tasks=TASKS)
    assert os.listdir(real) == ["pretrained.safetensors"]
    assert (real / "pretrained.safetensors").read_bytes() == b"the user's weights"
    assert os.listdir(tmp_path) == ["checkpoints"]  # no temporary sibling left
    folder = config.fixtures.dir
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError, match=r"holds fixtures of other settings: classes_per_task 3 \(requested 2\)"):
        clip_suite.make_fixtures(folder, config.layout, tasks=TASKS, classes_per_task=2)
    with pytest.raises(ValueError, match=r"other settings: tasks \['eurosat', 'gtsrb'\] \(requested \['eurosat'\]\)"):
        clip_suite.make_fixtures(folder, config.layout, tasks=("eurosat",))
    other = "hf" if config.layout == "open_clip" else "open_clip"
    with pytest.raises(ValueError, match=f"layout '{config.layout}' \\(requested '{other}'\\)"):
        clip_suite.make_fixtures(folder, other, tasks=TASKS)
    assert sorted(os.listdir(folder)) == before
    assert clip_suite.make_fixtures(folder, config.layout, tasks=TASKS) == clip_suite.fixture_paths(folder, TASKS)


def test_config_grids_are_numpys_linspace_rounded():
    from mtl_jax.config import linspace_grid

    assert linspace_grid(0.1, 1.0, 10) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    for lo, hi, num in ((0.0, 1.0, 11), (0.2, 0.6, 5), (0.1, 1.5, 15), (0.3, 0.3, 1)):
        assert linspace_grid(lo, hi, num) == tuple(float(round(v, 4)) for v in np.linspace(lo, hi, num))

