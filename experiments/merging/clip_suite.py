"""The CLIP ViT-B/32 8-task merging suite (task arithmetic / TIES / AdaMerging / FusionBench) on a
user's checkpoints and image folders.

    python -m experiments.merging.clip_suite --config configs/merge/clip_vit_b32_8tasks.py \\
        --config.pretrained=/ckpt/ViT-B-32.safetensors --config.data_root=/data ...
    python -m experiments.merging.clip_suite --config configs/merge/clip_vit_b32_8tasks.py:smoke  # fixtures

One pretrained CLIP (both towers) and one fine-tuned image encoder per task; each task's head is
the frozen zero-shot classifier of the pretrained text tower (``mtl_jax.merging.zero_shot``).
Rows: the pretrained image encoder (zero-shot), each fine-tuned encoder on its own task
(individual), then the rows of ``experiments.merging.rows`` on the image encoders (every entry of
``MERGE_METHODS`` that applies to T models, grid hyperparameters picked on validation images held
out of each train split; TALL-mask retrieval and EMR (one model per task); AdaMerging on
unlabelled test batches, aTLAS and Self Positioning on labelled validation images). Images are
decoded once into uint8 caches under ``config.cache_dir`` (``mtl_jax.data.image_folder``) and
streamed to the device in batches. Writes ``config.out`` + ``.md`` / ``.json``: the FusionBench
table layout (one row per method, a column per task + the average) beside the papers' numbers.

:func:`make_fixtures` writes tiny image folders and random tiny CLIP checkpoints (either layout)
whose labels are each fine-tuned model's own predictions, so every individual model scores 100%
(``:smoke``, the tests, ``benchmarks/device/clip_merge_gpu.py --smoke``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import NamedTuple, Sequence

import jax
import numpy as np

from experiments import common
from experiments.merging.report import markdown_table
from experiments.merging.rows import (
    PER_TASK_ROWS, emr_rows, learned_methods, merge_methods, merged_accuracies, tall_mask_rows)
from experiments.merging.statistics import Context, accuracy, chunked_merge_statistics, to_merge_space
from experiments.merging.training import EvalSet
from mtl_jax.checkpoints import load_into, read_checkpoint, source_shapes, write_safetensors
from mtl_jax.data.image_folder import Batches, cache_images, cache_key, read_image_folder, split_folder
from mtl_jax.merging import zero_shot as zs
from mtl_jax.merging.output_safety import discard, fsync_tree, temp_sibling
from mtl_jax.models.pretrained.clip import (
    CLIPConfig, clip_renames, clip_template, clip_tiny, clip_vision_renames, clip_vit_b32, for_layout, load_clip)
from mtl_jax.registry import lookup

CONFIG = os.path.join(common.CONFIGS, "merge", "clip_vit_b32_8tasks.py")
BASELINES = ("Pretrained (zero-shot)", "Individual (fine-tuned)")
PRESETS = {"vit_b32": clip_vit_b32, "tiny": clip_tiny}

# Published ViT-B/32 8-task accuracies (%): SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD, average.
# FusionBench: docs/modelpool/clip_vit.md (HF openai/clip-vit-base-patch32 and FusionBench's fine-tuned encoders).
FUSIONBENCH = {
    "Pretrained (zero-shot)": (63.2, 59.8, 60.7, 46.0, 31.6, 32.5, 48.2, 43.9, 48.2),
    "Individual (fine-tuned)": (75.0, 78.3, 95.2, 99.0, 97.3, 98.9, 99.6, 79.7, 90.3),
    "Weight averaging": (65.4, 62.6, 70.8, 76.9, 64.5, 54.9, 86.3, 50.9, 66.5),
    "Fisher": (66.7, 64.0, 72.2, 91.6, 69.0, 64.3, 83.5, 53.7, 70.6),
    "RegMean": (68.6, 70.0, 84.6, 95.4, 92.6, 83.4, 98.4, 66.1, 82.4),
    "Task arithmetic": (57.1, 55.7, 64.9, 76.7, 77.9, 68.5, 96.1, 47.2, 68.0),
    "TIES": (67.1, 64.2, 74.1, 76.8, 77.7, 69.4, 94.1, 54.0, 72.2),
    "AdaMerging (task-wise)": (58.6, 56.9, 69.8, 82.4, 70.3, 58.9, 97.2, 55.3, 68.7),
    "AdaMerging (layer-wise)": (67.9, 71.3, 83.5, 92.7, 87.4, 92.9, 98.2, 67.0, 82.6),
    "Iso-C": (69.8, 72.9, 86.0, 89.8, 87.6, 92.4, 98.5, 65.5, 82.8),
    "Iso-CTS": (71.1, 74.6, 86.5, 89.0, 83.4, 90.4, 98.1, 68.5, 82.7),
}
# AdaMerging (Yang et al. ICLR 2024; task_vectors' open_clip checkpoints): the AdaMerging rows from the official
# logs (EnnengYang/AdaMerging logs/ViT-B-32/, epoch 499), the other averages from the paper's table.
ADAMERGING_LOGS = {
    "AdaMerging (task-wise)": (58.0, 53.2, 68.8, 85.7, 81.2, 84.5, 92.4, 44.8, 71.1),
    "AdaMerging (layer-wise)": (64.5, 68.1, 79.3, 93.9, 87.0, 92.0, 97.5, 59.1, 80.2),
    "AdaMerging++ (layer-wise)": (66.7, 68.4, 82.3, 94.3, 89.6, 89.0, 98.3, 60.6, 81.2),
}
ADAMERGING_PAPER_AVG = {"Individual (fine-tuned)": 90.5, "Weight averaging": 65.8, "Fisher": 68.3, "RegMean": 71.8,
                        "Task arithmetic": 69.1, "TIES": 72.4, "AdaMerging (task-wise)": 71.1,
                        "AdaMerging (layer-wise)": 80.1, "AdaMerging++ (layer-wise)": 81.1}
OTHER_PAPERS = {"TSV-M": "85.9 (TSV paper; TA 70.8, Consensus TA 75.0 there)", "Consensus TA": "75.0 (TSV paper)"}

# ------------------------------------------------------------------------------------------ models


def clip_config(config) -> CLIPConfig:
    """The CLIP architecture of ``config.model`` (``preset`` + ``vision`` / ``text`` field overrides) in
    ``config.layout``."""
    preset = lookup(PRESETS, config.model.preset, "CLIP preset")()
    vision = dataclasses.replace(preset.vision, **dict(config.model.vision))
    text = dataclasses.replace(preset.text, **dict(config.model.text))
    return for_layout(CLIPConfig(vision, text), config.layout)


def _strip_prefix(state: dict, anchor: str) -> dict:
    """``state`` without the prefix its key ending in ``anchor`` has (task_vectors' ``model.visual.*``)."""
    if anchor in state:
        return state
    hits = [k for k in state if k.endswith("." + anchor)]
    if len(hits) != 1:
        return state
    prefix = hits[0][: -len(anchor)]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_image_encoder(path: str, config: CLIPConfig, layout: str, pretrained_visual) -> dict:
    """A fine-tuned image encoder's parameters from a checkpoint file in ``layout``: a full CLIP, an
    open_clip ``visual.*`` / task_vectors ``model.visual.*`` state dict, or a Hugging Face
    ``CLIPVisionModel`` (``vision_model.*``, with or without ``visual_projection.weight``). A missing
    projection is the pretrained one (FusionBench fine-tunes ``CLIPVisionModel`` under the pretrained
    projection); text-tower entries are ignored. CheckpointMismatchError names what does not fit."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fine-tuned checkpoint {path!r} does not exist")
    renames = clip_vision_renames(config.vision, layout)
    state = _strip_prefix(read_checkpoint(path), renames[0].source)
    sources = {r.source for r in renames}
    state = {k: v for k, v in state.items() if k in sources}
    keep = ()
    projection = renames[-1]
    if projection.source not in state:
        renames, keep = renames[:-1], ("proj/kernel",)
    return load_into(pretrained_visual, state, renames, what=f"CLIP image encoder ({path})", keep=keep)


class Models(NamedTuple):
    config: CLIPConfig
    pretrained: dict  # image encoder params
    text: dict  # text tower params
    logit_scale: float
    finetuned: list  # image encoder params per task


def load_models(config) -> Models:
    """The pretrained CLIP and each task's fine-tuned image encoder; the config is checked before
    any checkpoint is read."""
    missing = [t for t in config.tasks if t not in config.finetuned]
    if missing:
        raise ValueError(f"config.finetuned has no checkpoint for tasks {missing}; it names {sorted(config.finetuned)}")
    cfg = clip_config(config)
    _, params = load_clip(config.pretrained, config.layout, cfg)
    visual = params["visual"]
    finetuned = [load_image_encoder(config.finetuned[t], cfg, config.layout, visual) for t in config.tasks]
    return Models(cfg, visual, params["text"], float(params["logit_scale"]), finetuned)


# -------------------------------------------------------------------------------------------- data


class Task(NamedTuple):
    """One task: ``splits[split] = (images uint8 [N, S, S, 3] (memory map), labels [N])``: ``val`` and
    ``train`` (Fisher / RegMean statistics) are disjoint parts of the train folder, ``test`` the test folder."""

    name: str
    classes: tuple  # folder names
    class_names: list  # CLIP names
    splits: dict


def _cached(paths: Sequence[str], labels: np.ndarray, folder: str, split: str, size: int, workers: int):
    x = cache_images(paths, os.path.join(folder, f"{split}-{cache_key(paths, size)}.npy"), size, workers=workers)
    return x, np.asarray(labels, np.int32)


def load_task(config, name: str, size: int) -> Task:
    """Index task ``name``'s folders, pick the validation / statistics / test examples (a fixed
    permutation of seed ``config.data_seed``) and cache them decoded."""
    spec = config.datasets[name]
    root = os.path.join(config.data_root, spec.folder)
    train = read_image_folder(split_folder(root, tuple(spec.train)))
    test = read_image_folder(split_folder(root, tuple(spec.test)))
    if train.classes != test.classes:
        raise ValueError(f"task {name}: train folder {train.root!r} and test folder {test.root!r} have different "
                         f"classes ({len(train.classes)} vs {len(test.classes)})")
    rng = np.random.default_rng(config.data_seed)
    order = rng.permutation(len(train.paths))
    n_val = config.merge.val_per_task + config.learned.atlas_examples_per_task
    n_stats = config.merge.stats_examples
    if len(order) < n_val + n_stats:
        raise ValueError(f"task {name}: {len(order)} train images cannot hold {n_val} validation + {n_stats} "
                         "statistics images (lower merge.val_per_task / merge.stats_examples)")
    test_idx = np.arange(len(test.paths))
    if config.max_test and len(test_idx) > config.max_test:
        test_idx = np.sort(rng.permutation(len(test_idx))[: config.max_test])
    folder = os.path.join(config.cache_dir, name)
    pick = lambda index, idx: ([index.paths[i] for i in idx], index.labels[idx])  # noqa: E731
    splits = {"val": _cached(*pick(train, order[:n_val]), folder, "val", size, config.workers),
              "train": _cached(*pick(train, order[n_val:n_val + n_stats]), folder, "train", size, config.workers),
              "test": _cached(*pick(test, test_idx), folder, "test", size, config.workers)}
    names = zs.class_names(name, train.classes, dict(config.classnames.get(name, {})))
    return Task(name, train.classes, names, splits)


# ------------------------------------------------------------------------------------------- rows


def zero_shot_heads(config, models: Models, tasks: Sequence[Task]) -> list:
    tokenizer = zs.CLIPTokenizer(config.tokenizer, models.config.text.context_length)
    heads = []
    for t in tasks:
        weights = zs.zero_shot_weights(models.config.text, models.text, tokenizer, zs.prompts(t.name, t.class_names))
        heads.append(zs.classification_head(weights, models.logit_scale))
    return heads


def suite_rows(config, models: Models, tasks: Sequence[Task], heads: list, seed: int = 0) -> dict:
    """``{row: {"acc": [T], "normalised": [T], "hparams", "seconds"}}`` for the baselines and every method."""
    trunk = zs.ZeroShotTrunk(models.config.vision)
    eval_set = lambda x, y: EvalSet(Batches(x, config.eval_batch), y)  # noqa: E731
    val = [eval_set(x[: config.merge.val_per_task], y[: config.merge.val_per_task])
           for x, y in (t.splits["val"] for t in tasks)]
    test = [eval_set(*t.splits["test"]) for t in tasks]
    rows, timings = {}, {}
    t0 = time.time()
    rows["Pretrained (zero-shot)"] = ({}, np.array([accuracy(trunk, models.pretrained, h, d)
                                                    for h, d in zip(heads, test)]))
    rows["Individual (fine-tuned)"] = ({}, np.array([accuracy(trunk, ft, h, d)
                                                     for ft, h, d in zip(models.finetuned, heads, test)]))
    timings["baselines"] = time.time() - t0
    for name in BASELINES:
        common.log(f"{name}: test accuracy {np.round(rows[name][1], 4).tolist()}")
    ctx = Context(trunk, models.pretrained, to_merge_space(models.pretrained),
                  [to_merge_space(ft) for ft in models.finetuned], heads, val, test,
                  np.array([accuracy(trunk, ft, h, d) for ft, h, d in zip(models.finetuned, heads, val)]))

    @functools.cache
    def statistics():
        return chunked_merge_statistics(trunk, models.finetuned, heads, tasks, config.merge.stats_examples, seed,
                                        config.merge.stats_chunk)

    @functools.cache
    def ta_lambda() -> float:
        hparams = rows["Task arithmetic"][0] if "Task arithmetic" in rows else methods["Task arithmetic"]()[0]
        return float(hparams["lam"])

    methods = {**merge_methods(config, ctx, statistics, seed), **learned_methods(config, ctx, tasks, seed, ta_lambda),
               "TALL-mask retrieval": lambda: tall_mask_rows(config, ctx), "EMR": lambda: emr_rows(ctx)}
    wanted = list(config.methods) if config.methods else list(methods)
    unknown = sorted(set(wanted) - set(methods))
    if unknown:
        raise ValueError(f"unknown method rows {unknown}; valid: {list(methods)}")
    for name in methods:
        if name not in wanted:
            continue
        t0 = time.time()
        hparams, out = methods[name]()
        rows[name] = (hparams, out if name in PER_TASK_ROWS else merged_accuracies(ctx, out, "test"))
        timings[name] = time.time() - t0
        common.log(f"{name}: mean test accuracy {rows[name][1].mean():.4f} ({timings[name]:.1f} s)")
    individual = rows["Individual (fine-tuned)"][1]
    return {name: {"acc": acc.tolist(), "normalised": (acc / np.maximum(individual, 1e-12)).tolist(),
                   "hparams": hp, "seconds": round(timings.get(name, 0.0), 2)}
            for name, (hp, acc) in rows.items()}


# ----------------------------------------------------------------------------------------- report


def _paper_cell(row: str) -> str:
    parts = []
    if row in FUSIONBENCH:
        parts.append(f"{FUSIONBENCH[row][-1]:.1f} FB")
    if row in ADAMERGING_LOGS:
        parts.append(f"{ADAMERGING_LOGS[row][-1]:.1f} AM logs")
    elif row in ADAMERGING_PAPER_AVG:
        parts.append(f"{ADAMERGING_PAPER_AVG[row]:.1f} AM")
    if row in OTHER_PAPERS:
        parts.append(OTHER_PAPERS[row])
    return "; ".join(parts) or "-"


def report_text(config, rows: dict, names: Sequence[str], wall: float, argv: Sequence[str],
                module: str = "experiments.merging.clip_suite") -> str:
    display = [zs.DISPLAY_NAMES.get(n, n) for n in names]
    ours = markdown_table({0: rows}, display, "acc").splitlines()
    ours[0] += " paper avg |"
    ours[1] += "---|"
    for i, row in enumerate(r for r in rows if not r.startswith("_")):
        ours[i + 2] += f" {_paper_cell(row)} |"
    paper = ["| method (published) | " + " | ".join(zs.DISPLAY_NAMES[d] for d in zs.DATASETS) + " | avg |",
             "|---" * (len(zs.DATASETS) + 2) + "|"]
    paper += [f"| {row} (FusionBench) | " + " | ".join(f"{v:.1f}" for v in vals) + " |" for row, vals in FUSIONBENCH.items()]
    paper += [f"| {row} (AdaMerging logs) | " + " | ".join(f"{v:.1f}" for v in vals) + " |"
              for row, vals in ADAMERGING_LOGS.items()]
    hp = "\n".join(f"- {row}: {json.dumps(v['hparams'])}" for row, v in rows.items()
                   if not row.startswith("_") and v["hparams"])
    caption = (
        f"CLIP {config.model.preset} ({config.layout} layout) image encoders: pretrained {config.pretrained}, one "
        f"fine-tuned encoder per task; heads: frozen zero-shot classifiers of the pretrained text tower (task_vectors' "
        f"templates, class names from the class folders). Hyperparameters picked by mean normalised accuracy on "
        f"{config.merge.val_per_task} validation images per task held out of the train folders (seed "
        f"{config.data_seed}); Fisher / RegMean on {config.merge.stats_examples} other train images per task; "
        f"AdaMerging: {config.learned.steps} Adam steps (lr {config.learned.lr}, init {config.learned.init}) on "
        f"batches of {config.learned.batch_per_task} unlabelled test images per task from a pool of "
        f"{config.learned.pool_per_task}. Test images per task: "
        + ", ".join(f"{d} {n}" for d, n in zip(display, rows.get("_test_sizes", {}).get("n", [])))
        + f". Paper columns: FB = FusionBench's CLIP-ViT-B/32 table (HF checkpoints), AM = AdaMerging (ICLR 2024, "
        f"task_vectors' open_clip checkpoints). Wall time {wall / 60:.1f} min.")
    return "\n\n".join([
        "# CLIP ViT-B/32 8-task model merging suite", caption,
        "## Absolute test accuracy (%)", "\n".join(ours),
        "## Normalised accuracy (% of the individual fine-tuned model on each task)",
        markdown_table({0: rows}, display, "normalised"),
        "## Published numbers (%)", "\n".join(paper),
        "## Selected hyperparameters", hp or "(none)",
        common.produced_by(module, argv),
    ]) + "\n"


def run_suite(config, argv: Sequence[str] = (), module: str = "experiments.merging.clip_suite") -> dict:
    """Load, cache, evaluate and merge; write ``config.out`` + ``.md`` / ``.json`` (its footer: ``python -m
    <module> <argv>``). Returns
    ``{"rows": ..., "tasks": names, "table": markdown}``."""
    start = time.time()
    if config.get("fixtures") and config.fixtures.generate:
        make_fixtures(config.fixtures.dir, config.layout, tasks=tuple(config.tasks),
                      classes_per_task=config.fixtures.classes_per_task, seed=config.fixtures.seed)
    models = load_models(config)
    tasks = [load_task(config, name, models.config.vision.image_size) for name in config.tasks]
    common.log(f"data cached ({time.time() - start:.1f} s)")
    heads = zero_shot_heads(config, models, tasks)
    rows = suite_rows(config, models, tasks, heads)
    text = report_text(config, {**rows, "_test_sizes": {"n": [len(t.splits["test"][1]) for t in tasks]}},
                       list(config.tasks), time.time() - start, argv, module)
    common.write_text(config.out + ".md", text)
    common.write_json(config.out + ".json", {
        "config": config.to_dict(), "wall_seconds": time.time() - start, "tasks": list(config.tasks),
        "test_sizes": [len(t.splits["test"][1]) for t in tasks], "rows": rows,
        "paper": {"fusionbench": FUSIONBENCH, "adamerging_logs": ADAMERGING_LOGS,
                  "adamerging_paper_avg": ADAMERGING_PAPER_AVG}}, indent=1, default=float)
    return {"rows": rows, "tasks": list(config.tasks), "table": text}


# --------------------------------------------------------------------------------------- fixtures

# Real folder names of each dataset (a few per task), so the fixtures exercise the class-name mapping.
FIXTURE_FOLDERS = {
    "sun397": ("a_abbey", "b_bakery_shop", "c_canyon", "d_desert_sand"),
    "cars": ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012", "BMW M3 Coupe 2012"),
    "resisc45": ("airplane", "baseball_diamond", "sea_ice", "storage_tank"),
    "eurosat": ("AnnualCrop", "Forest", "HerbaceousVegetation", "SeaLake"),
    "svhn": ("0", "1", "2", "3"),
    "gtsrb": ("00000", "00001", "00014", "00042"),
    "mnist": ("0", "1", "2", "3"),
    "dtd": ("banded", "polka-dotted", "striped", "zigzagged"),
}


def fixture_clip_config(layout: str) -> CLIPConfig:
    """The fixtures' CLIP: :func:`clip_tiny` with a 512-word vocabulary and a 32-token context."""
    base = clip_tiny(layout)
    return CLIPConfig(base.vision, dataclasses.replace(base.text, vocab_size=512, context_length=32))


def write_fixture_tokenizer(path: str, texts: Sequence[str]) -> None:
    """A word-level ``tokenizer.json`` over the lowercased words of ``texts`` with CLIP's special
    tokens (``<|endoftext|>`` the largest id, as in CLIP's vocabulary)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre
    tokenizer.save(path)


def _perturbed(state: dict, scale: float, rng: np.random.Generator) -> dict:
    return {k: v + (scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in state.items()}


FIXTURES_FILE = "fixtures.json"  # the settings a fixtures folder was generated with; written last


def fixture_paths(folder: str, tasks: Sequence[str]) -> dict:
    """Where :func:`make_fixtures` puts each file under ``folder``."""
    return {"pretrained": os.path.join(folder, "pretrained.safetensors"),
            "tokenizer": os.path.join(folder, "tokenizer.json"), "data_root": os.path.join(folder, "data"),
            "finetuned": {t: os.path.join(folder, "finetuned", f"{t}.safetensors") for t in tasks}}


def _reuse_fixtures(folder: str, settings: dict) -> bool:
    """True when ``folder`` holds finished fixtures of ``settings``, False when it is absent or an
    empty folder; ValueError (one line naming the folder) for anything else: fixtures of other
    settings, a file, or a folder holding files but no fixtures file (never ours to write into)."""
    done = os.path.join(folder, FIXTURES_FILE)
    if os.path.isfile(done):
        stored = (common.read_json(done) or {}).get("settings", {})
        differ = [f"{k} {stored.get(k)!r} (requested {v!r})" for k, v in settings.items() if stored.get(k) != v]
        if differ:
            raise ValueError(f"fixtures folder {folder!r} holds fixtures of other settings: {'; '.join(differ)}; "
                             "name another fixtures.dir or move this one aside")
        return True
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"fixtures.dir {folder!r} is a file, not a folder")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"fixtures.dir {folder!r} holds files but no {FIXTURES_FILE}: not a fixtures folder, "
                         "refusing to write into it; name a new or empty folder")
    return False


def make_fixtures(folder: str, layout: str = "open_clip", tasks: Sequence[str] = zs.DATASETS,
                  classes_per_task: int = 3, images_per_class: tuple = (10, 4), seed: int = 0,
                  finetune_scale: float = 0.5, weight_std: float = 0.3) -> dict:
    """Tiny fixtures under ``folder``: ``pretrained.safetensors`` (a random :func:`fixture_clip_config`
    CLIP in ``layout``: weights N(0, ``weight_std``^2), large enough for images to get different
    predictions), ``finetuned/<task>.safetensors`` (image-tower entries only, pretrained +
    N(0, (``finetune_scale`` x ``weight_std``)^2) noise; HF ones without the projection, as
    FusionBench's ``CLIPVisionModel``), ``tokenizer.json`` and ``data/<task>/{train,test}/<class>/*.png``
    of varied sizes whose class is what the task's fine-tuned encoder predicts under its zero-shot head
    (individual accuracy 100% by construction), and :data:`FIXTURES_FILE` with the settings. Returns
    the paths (:func:`fixture_paths`).

    A finished folder of the same settings is reused; one of other settings, or an existing folder
    with files but no :data:`FIXTURES_FILE`, is refused (ValueError naming it), so a ``fixtures.dir``
    pointing at real checkpoints never has them replaced. Built in a hidden temporary sibling and
    renamed to ``folder`` at the end: an interrupted run leaves no half-built ``folder``."""
    settings = {"layout": layout, "tasks": list(tasks), "classes_per_task": classes_per_task,
                "images_per_class": list(images_per_class), "seed": seed, "finetune_scale": finetune_scale,
                "weight_std": weight_std}
    if _reuse_fixtures(folder, settings):
        return fixture_paths(folder, tasks)
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    work = temp_sibling(folder)
    try:
        _build_fixtures(work, settings)
        common.write_json(os.path.join(work, FIXTURES_FILE), {"settings": settings})
        fsync_tree(work)
        try:
            os.rename(work, folder)  # replaces only an absent or empty folder
        except OSError:
            if not _reuse_fixtures(folder, settings):  # another process finished first with the same settings
                raise
    finally:
        discard(work)
    return fixture_paths(folder, tasks)


def _build_fixtures(folder: str, settings: dict) -> None:
    """The files of :func:`make_fixtures` ``(folder, **settings)`` under the new folder ``folder``."""
    from PIL import Image

    layout, tasks = settings["layout"], settings["tasks"]
    weight_std, finetune_scale = settings["weight_std"], settings["finetune_scale"]
    rng = np.random.default_rng(settings["seed"])
    cfg = fixture_clip_config(layout)
    renames = clip_renames(cfg, layout)
    shapes = source_shapes(clip_template(cfg), renames)
    leaf = {r.source: r.target[-1] for r in renames}  # LayerNorm scales 1, biases 0, other weights N(0, 0.3^2)
    state = {k: (np.ones(s) if leaf[k] == "scale" else np.zeros(s) if leaf[k] == "bias"
                 else weight_std * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    state["logit_scale"] = np.asarray(np.log(100.0), np.float32)
    os.makedirs(os.path.join(folder, "finetuned"))
    paths = fixture_paths(folder, tasks)
    write_safetensors(paths["pretrained"], state)
    vision = {r.source for r in clip_vision_renames(cfg.vision, layout)}
    all_prompts = [p for t in tasks for per_class in zs.prompts(t, zs.class_names(t, FIXTURE_FOLDERS[t])) for p in per_class]
    write_fixture_tokenizer(paths["tokenizer"], all_prompts)
    _, params = load_clip(paths["pretrained"], layout, cfg)
    tokenizer = zs.CLIPTokenizer(paths["tokenizer"], cfg.text.context_length)
    trunk = zs.ZeroShotTrunk(cfg.vision)
    size = cfg.vision.image_size
    for task in tasks:
        ft_state = _perturbed({k: v for k, v in state.items() if k in vision}, finetune_scale * weight_std, rng)
        if layout == "hf":
            ft_state.pop("visual_projection.weight")
        write_safetensors(paths["finetuned"][task], ft_state)
        ft = load_image_encoder(paths["finetuned"][task], cfg, layout, params["visual"])
        folders = FIXTURE_FOLDERS[task][:settings["classes_per_task"]]
        weights = zs.zero_shot_weights(cfg.text, params["text"], tokenizer,
                                       zs.prompts(task, zs.class_names(task, folders)))
        head = zs.classification_head(weights, params["logit_scale"])
        for split, per_class in zip(("train", "test"), settings["images_per_class"]):
            _write_predicted_images(os.path.join(folder, "data", task, split), folders, per_class, size, trunk, ft,
                                    head, rng, Image)


def _write_predicted_images(root: str, folders, per_class: int, size: int, trunk, params, head, rng, image_lib) -> None:
    """Random images of varied sizes filed under the class ``params`` + ``head`` predict, until every
    class folder holds ``per_class`` (ValueError after 50 rounds)."""
    from experiments.merging.training import head_logits

    from mtl_jax.data.image_folder import load_clip_image

    counts = [0] * len(folders)
    for folder in folders:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    tmp = os.path.join(root, ".staging")
    os.makedirs(tmp, exist_ok=True)
    for round_ in range(50):
        if min(counts) >= per_class:
            break
        candidates = []
        for i in range(64):
            h, w = int(rng.integers(size, 2 * size)), int(rng.integers(size, 2 * size))
            base = rng.integers(0, 256, (1, 1, 3)) * rng.random()
            pixels = np.clip(base + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
            path = os.path.join(tmp, f"{round_}_{i}.png")
            image_lib.fromarray(pixels).save(path)
            candidates.append(path)
        x = np.stack([load_clip_image(p, size) for p in candidates])
        pred = np.asarray(jax.numpy.argmax(head_logits(head, trunk.apply({"params": params}, x)), -1))
        for path, c in zip(candidates, pred):
            if counts[c] < per_class:
                os.replace(path, os.path.join(root, folders[c], f"img{counts[c]:03d}.png"))
                counts[c] += 1
            else:
                os.remove(path)
    os.rmdir(tmp)
    if min(counts) < per_class:
        raise ValueError(f"fixture images: the model predicts classes {counts} of {list(folders)} in {root}")


def main(argv=None):
    argv = common.argv_or_sys(argv)
    config = common.parse_config_file(argv, __doc__.splitlines()[0], CONFIG)
    print(run_suite(config, argv)["table"])


if __name__ == "__main__":
    common.run_main(main)
