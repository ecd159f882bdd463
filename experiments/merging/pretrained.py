"""Merging benchmark on real pretrained models: MiniLM-L6 on six Wikipedia text tasks, EfficientNet-Lite0
on seven MultiMNIST image tasks.

    nohup nice python -m experiments.merging.pretrained --model=minilm --seeds=0 &     # then --seeds=0,1,2
    python -m experiments.merging.pretrained --model=efficientnet --seeds=0,1,2
    python -m experiments.merging.pretrained --model=minilm --smoke                   # tiny, for tests
    ... --config.finetune.steps=300 --config.methods="('Task arithmetic','TIES')"      # any config key

The protocol of ``experiments.merging.run`` (same rows, selection and caches: ``rows.run_seed``) with
the pretrained trunk in place of the rotation-pretrained toy ViT: a linear probe on the frozen
pretrained features per task (the "pretrained" row, in place of CLIP's zero-shot head), then the
whole backbone fine-tuned per task from there with the head frozen at its probe (as the papers keep
CLIP's zero-shot text heads fixed), one model per task from the same pretrained weights; multi-task
training; every merge method (grid hyperparameters by mean normalised validation accuracy),
TALL-mask / EMR retrieval and the learned coefficients (AdaMerging task- / layer-wise / ++, aTLAS,
Self Positioning). Stages are cached under ``config.workdir`` (each fine-tuned model, each row as it
finishes), so a stopped run resumes. Writes ``experiments/results/merging_pretrained_<model>.{md,json}``
with the papers' CLIP ViT-B/32 numbers beside ours and which of their claims hold here.

Backbones: ``minilm`` = all-MiniLM-L6-v2 (22.7M parameters, mean pooling; ``mtl_jax.models.pretrained.bert``),
inputs the first ``max_len`` tokens of each extract (``tasks.wiki_tasks``); ``efficientnet`` = ImageNet
EfficientNet-Lite0 without its classifier (3.4M parameters), ``image_size`` px RGB inputs
(``tasks.multimnist_tasks``), BatchNorm on its ImageNet running statistics throughout
(``training.FrozenStatsTrunk``), 1x1 convolution kernels seen as matrices by the SVD methods and RegMean's
Dense-only statistics (none here: RegMean averages every convolution).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import numpy as np
from ml_collections import ConfigDict

from experiments import common
from experiments.merging import tasks as task_lib
from experiments.merging.report import result_sections
from experiments.merging.rows import PER_TASK_ROWS, RowHooks, run_seed
from experiments.merging.statistics import chunked_merge_statistics
from experiments.merging.training import pretrained_setup
from mtl_jax.config import apply_overrides, config_from_file, linspace_grid
from mtl_jax.merging.tree import map_with_path

MODELS = {"minilm": "minilm_l6", "efficientnet": "efficientnet_lite0"}

# CLIP ViT-B/32, 8 tasks, average absolute test accuracy (%): the AdaMerging paper's table (Yang et al.,
# ICLR 2024; official logs EnnengYang/AdaMerging logs/ViT-B-32/) and FusionBench's reproduction
# (/work/shared/references/model-merging.md; TSV paper for Consensus TA / TSV-M). None: not reported there.
PAPER = {  # row: (AdaMerging paper, FusionBench, TSV paper)
    "Pretrained (linear probe)": (None, 48.2, None),
    "Individual (fine-tuned)": (90.5, 90.3, None),
    "Multi-task trained": (88.9, 88.6, None),
    "Weight averaging": (65.8, 66.5, None),
    "Fisher": (68.3, 70.6, None),
    "RegMean": (71.8, 82.4, None),
    "Task arithmetic": (69.1, 68.0, 70.8),
    "TIES": (72.4, 72.2, None),
    "Consensus TA": (None, None, 75.0),
    "TSV-M": (None, 83.1, 85.9),
    "Iso-C": (None, 82.8, None),
    "AdaMerging (task-wise)": (71.1, 68.7, None),
    "AdaMerging (layer-wise)": (80.1, 82.6, None),
    "AdaMerging++ (layer-wise)": (81.1, None, None),
}
PAPER_INDIVIDUAL = (90.5, 90.3)  # the individual models the first two columns' normalised figures divide by
# The papers' claims this benchmark checks: (row, reference row, threshold on the mean normalised accuracy or None).
CLAIMS = (
    ("TIES", "Task arithmetic"),
    ("AdaMerging (layer-wise)", "Task arithmetic"),
    ("AdaMerging (task-wise)", "Task arithmetic"),
    ("LiNeS (TA)", "Task arithmetic"),
    ("aTLAS", "Task arithmetic"),
    ("Iso-CTS", "Task arithmetic"),
    ("TSV-M", "Task arithmetic"),
)


def get_config(model: str, smoke: bool = False) -> ConfigDict:
    """The benchmark's settings for ``model`` (a key of ``MODELS``): ``configs/merge/vit_benchmark.py``'s keys
    with the pretrained backbone's data, budgets and grids (sized for a 2-core CPU; the report records each
    run's wall time)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid: {list(MODELS)}")
    c = config_from_file(os.path.join(common.CONFIGS, "merge", "vit_benchmark.py"))
    c.backbone = MODELS[model]
    c.suite = "wiki" if model == "minilm" else "multimnist"  # the tasks (tasks.wiki_tasks / tasks.multimnist_tasks)
    c.model = ConfigDict()  # the toy ViT's architecture: unused
    c.freeze_heads = True
    c.max_len, c.image_size = 32, 32  # MiniLM tokens per extract; EfficientNet input px
    c.num_train, c.num_val, c.num_test = 6000, 500, 1000  # MultiMNIST pairs
    # The papers' grids (TA / Consensus / DARE: lambda in linspace(0, 1, 11)[1:] as tall_masks / LiNeS; TIES up to 1.5;
    # TSV-M / Iso alpha 0.1-3.0 as their code).
    c.merge.update(dict(
        val_per_task=50,
        ta_lambdas=linspace_grid(0.1, 1.0, 10),
        dare_lambdas=(0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
        ties_lambdas=(0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5),
        lines_betas=linspace_grid(0.0, 1.0, 5),
        svd_alphas=(0.2, 0.5, 0.8, 1.0, 1.5, 2.0),
        stats_examples=32,
        stats_chunk=8,  # Fisher: per-example gradients of this many examples at a time (memory: chunk x parameters)
    ))
    adamw = dict(name="adamw", schedule="cosine", weight_decay=0.0, grad_clip_norm=1.0)
    if model == "minilm":
        c.tasks = task_lib.WIKI_TASKS
        c.max_eval = 200  # val and test examples per task (nationality has 102 / 88)
        c.eval_batch = 50
        c.probe.update(dict(steps=200, max_examples=1024))
        c.finetune.update(dict(steps=120, batch_size=16, optim=ConfigDict(dict(adamw, lr=1e-4, warmup_steps=12))))
        c.multitask.update(dict(steps=120, batch_size=8, optim=ConfigDict(dict(adamw, lr=1e-4, warmup_steps=12))))
        c.learned.update(dict(steps=60, batch_per_task=8, pool_per_task=200, atlas_steps=40, atlas_examples_per_task=12,
                              atlas_eval_every=20, sp_steps=40))
    else:
        c.tasks = task_lib.MULTIMNIST_TASKS
        c.max_eval = 500
        c.eval_batch = 250
        c.merge.val_per_task = 125
        c.probe.update(dict(steps=300, max_examples=2048))
        # A small lr: BatchNorm stays on its ImageNet statistics, so nothing renormalises the activations as the
        # weights move, and at AdamW 3e-4 the fine-tuning loss rises from the first steps.
        c.finetune.update(dict(steps=300, batch_size=64, optim=ConfigDict(dict(adamw, lr=5e-5, warmup_steps=30))))
        c.multitask.update(dict(steps=300, batch_size=16, optim=ConfigDict(dict(adamw, lr=5e-5, warmup_steps=30))))
        c.learned.update(dict(steps=100, batch_per_task=16, pool_per_task=500, atlas_steps=60,
                              atlas_examples_per_task=32, atlas_eval_every=20, sp_steps=60))
    c.workdir = f"runs/merging_pretrained_{model}"
    c.out = os.path.join(common.RESULTS, f"merging_pretrained_{model}")
    if smoke:
        c.tasks = c.tasks[:2]
        c.seeds = (0,)
        c.max_len, c.image_size = 16, 32
        c.num_train, c.num_val, c.num_test = 64, 40, 40
        c.max_train, c.max_eval = 64, 40
        c.eval_batch = 20
        c.probe.update(dict(steps=5, max_examples=32))
        c.finetune.update(dict(steps=2, batch_size=4))
        c.multitask.update(dict(steps=2, batch_size=2))
        c.merge.update(dict(val_per_task=16, ta_lambdas=(0.3, 1.0), dare_lambdas=(0.3,), ties_lambdas=(1.0,),
                            lines_betas=(0.5,), svd_alphas=(1.0,), tall_lambdas=(0.4,), stats_examples=4, stats_chunk=2))
        c.learned.update(dict(steps=2, batch_per_task=2, pool_per_task=8, atlas_steps=2, atlas_examples_per_task=4,
                              atlas_eval_every=2, sp_steps=2))
        c.workdir = f"/tmp/mtl_jax_merging_pretrained_smoke/{model}"
        c.out = f"/tmp/mtl_jax_merging_pretrained_smoke/merging_pretrained_{model}"
    return c


def build_tasks(config):
    """The task list of ``config`` (``config.suite``: wiki tasks for MiniLM, MultiMNIST tasks for EfficientNet)."""
    if config.suite == "wiki":
        return task_lib.wiki_tasks(config.tasks, config.max_len, config.data_seed, config.max_train, config.max_eval)
    return task_lib.multimnist_tasks(config.tasks, config.image_size, config.num_train, config.num_val,
                                     config.num_test, config.data_seed, config.max_train, config.max_eval)


# ------------------------------------------------------------------------------------ row hooks


def conv_matrix_space(shared):
    """``{"shared": trunk}`` with every 1x1 convolution kernel [1, 1, C_in, C_out] viewed as the
    [C_in, C_out] matrix it is (the SVD methods treat it as a linear layer); other leaves unchanged."""
    return map_with_path(lambda path, x: x.reshape(x.shape[2:]) if x.ndim == 4 and x.shape[:2] == (1, 1) else x,
                         {"shared": shared})


def identity_space(shared):
    """``{"shared": trunk}``: a BERT trunk's Dense kernels are already [d_in, d_out] matrices."""
    return {"shared": shared}


def chunked_statistics(chunk: int, to_space):
    """The rows' statistics hook: :func:`experiments.merging.statistics.chunked_merge_statistics` of the
    fine-tuned trunks, ``chunk`` examples at a time (memory chunk x parameters, not N x parameters:
    22.7M-parameter MiniLM), Fisher in the merge space ``to_space``."""
    return lambda trunk, finetuned, heads, tasks, num_examples, seed: chunked_merge_statistics(
        trunk, [ft["shared"] for ft in finetuned], heads, tasks, num_examples, seed, chunk, to_space)


def row_hooks(config) -> RowHooks:
    space = conv_matrix_space if config.backbone == "efficientnet_lite0" else identity_space
    return RowHooks(space, chunked_statistics(config.merge.stats_chunk, space))


# -------------------------------------------------------------------------------------- report


def seed_means(results: dict, row: str, key: str = "acc") -> np.ndarray:
    """Mean over tasks of ``row``'s ``key`` per seed that has the row -> [S]."""
    return np.array([np.mean(r[row][key]) for r in results.values() if row in r])


def paper_table(results: dict) -> str:
    """Our average absolute / normalised accuracy per row beside the papers' CLIP ViT-B/32 8-task numbers."""
    rows = [n for n in next(iter(results.values())) if not n.startswith("_")]
    lines = ["| method | ours: avg acc | ours: normalised | AdaMerging paper (norm.) | FusionBench (norm.) | TSV paper |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        paper = PAPER.get(row, (None, None, None))
        cells = [f"{v:.1f} ({100 * v / PAPER_INDIVIDUAL[i]:.1f})" if v is not None and i < 2 else
                 (f"{v:.1f}" if v is not None else "") for i, v in enumerate(paper)]
        label = f"{row} (per-task models)" if row in PER_TASK_ROWS else row
        lines.append(f"| {label} | {common.mean_std(seed_means(results, row), 100, 1)} | "
                     f"{common.mean_std(seed_means(results, row, 'normalised'), 100, 1)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(results: dict) -> str:
    """Which of the papers' claims hold here, per claim: the two rows' mean accuracy over seeds and
    in how many seeds the claim holds."""
    lines = []
    for row, ref in CLAIMS:
        a, b = seed_means(results, row), seed_means(results, ref)
        if not len(a) or len(a) != len(b):
            lines.append(f"- {row} > {ref}: not run")
            continue
        wins = int(np.sum(a > b))
        verdict = "holds" if wins == len(a) else ("does not hold" if wins == 0 else "mixed")
        lines.append(f"- {row} > {ref}: **{verdict}** ({100 * a.mean():.1f} vs {100 * b.mean():.1f}; "
                     f"{wins}/{len(a)} seeds)")
    for row in PER_TASK_ROWS:
        norm = seed_means(results, row, "normalised")
        if len(norm):
            verdict = "holds" if np.all(norm >= 0.99) else ("does not hold" if np.all(norm < 0.99) else "mixed")
            lines.append(f"- {row} retrieves >= 99% of the individual models: **{verdict}** "
                         f"(normalised {common.mean_std(norm, 100, 1)}%)")
    return "\n".join(lines)


def caption(config, tasks, log: dict, wall: float, seeds: Sequence[int]) -> str:
    sizes = ", ".join(f"{t.name} ({t.num_classes}) {len(t.splits['train'][1])}/{len(t.splits['val'][1])}/"
                      f"{len(t.splits['test'][1])}" for t in tasks)
    ft, mt, lr = config.finetune, config.multitask, config.learned
    if config.suite == "wiki":
        what = (f"all-MiniLM-L6-v2 ({log['parameters'] / 1e6:.1f}M parameters, mean pooling) on the first "
                f"{config.max_len} tokens of English Wikipedia vital-article extracts")
    else:
        what = (f"ImageNet EfficientNet-Lite0 without its classifier ({log['parameters'] / 1e6:.2f}M parameters; "
                f"BatchNorm on the ImageNet running statistics throughout) on {config.image_size}x{config.image_size} "
                "MultiMNIST pairs of real MNIST digits")
    return (
        f"{what}. Tasks (classes) train/val/test: {sizes}. Pretrained = linear probe on the frozen features "
        f"(first {config.probe.max_examples} train examples, {config.probe.steps} full-batch Adam steps), standing in "
        f"for CLIP's zero-shot head; individual = the whole backbone fine-tuned per task with the head frozen at its "
        f"probe ({ft.steps} steps, batch {ft.batch_size}, AdamW lr {ft.optim.lr:g} cosine, no weight decay); "
        f"multi-task = the same from the probes, {mt.steps} steps with a batch of {mt.batch_size} from every task. "
        f"Merging acts on the backbone; every task keeps its probe head. Hyperparameters chosen per seed by mean "
        f"normalised accuracy on the first {config.merge.val_per_task} validation examples per task (TALL masks: "
        f"lambda_t per task); test on up to {config.max_eval or 'all'} per task. Fisher / RegMean: "
        f"{config.merge.stats_examples} train examples per task (papers: 256). AdaMerging: {lr.steps} Adam steps "
        f"(lr {lr.lr:g}; paper: 500) on batches of {lr.batch_per_task} unlabelled test examples per task from a pool "
        f"of {lr.pool_per_task}; aTLAS: {lr.atlas_steps} steps on {lr.atlas_examples_per_task} labelled validation "
        f"examples per task; Self Positioning: {lr.sp_steps} SGD steps on the same. Seeds {tuple(seeds)} (of {tuple(config.seeds)} asked) vary "
        f"probes, fine-tuning, multi-task training, DARE and the learned methods' batches (one pretrained model, one "
        f"data split). This invocation: {wall / 60:.1f} min wall, {common.cpu_seconds() / 60:.1f} CPU-min (2-core "
        "machine shared with other jobs; cached stages cost neither)."
    )


SCALE_NOTE = (
    "Scale against the papers: CLIP ViT-B/32 (88M image-tower parameters, pretrained on 400M image-text pairs) "
    "fine-tuned for 2,000+ steps of batch 128 at lr 1e-5 on eight datasets of 2k-100k images each, evaluated on "
    "their full test sets; here a {params:.1f}M-parameter model fine-tuned for {steps} steps of batch {batch} on "
    "{num} tasks sharing one input distribution, evaluated on a few hundred examples per task, AdaMerging with "
    "{ada} steps instead of 500. Compare the normalised columns (each benchmark divided by its own individual "
    "models), and read small gaps against the seed spread.")


def write_report(config, results: dict, tasks, log: dict, wall: float, argv: Sequence[str]) -> str:
    names = [t.name for t in tasks]
    title = ("MiniLM-L6 on six Wikipedia text tasks" if config.suite == "wiki" else
             "EfficientNet-Lite0 on seven MultiMNIST image tasks")
    text = "\n\n".join([
        f"# Model merging on a real pretrained model: {title}",
        caption(config, tasks, log, wall, list(results)),
        SCALE_NOTE.format(params=log["parameters"] / 1e6, steps=config.finetune.steps, batch=config.finetune.batch_size,
                          num=len(tasks), ada=config.learned.steps),
        "## Average accuracy beside the papers' CLIP ViT-B/32 8-task numbers (%)",
        paper_table(results),
        "## The papers' claims here",
        claims(results),
        *result_sections(results, names),
        common.produced_by("experiments.merging.pretrained", argv),
    ]) + "\n"
    common.write_text(config.out + ".md", text)
    common.write_json(config.out + ".json", {
        "config": config.to_dict(), "backbone": log, "wall_seconds": wall, "process_cpu_seconds": common.cpu_seconds(),
        "results": {str(s): r for s, r in results.items()}}, indent=1, default=float)
    return text


# ---------------------------------------------------------------------------------------- main


def run_benchmark(config, argv: Sequence[str] = ()) -> dict:
    """Every seed of ``config`` (:func:`get_config`), the report written after each seed.
    Returns ``{"results": {seed: rows}, "tasks": names, "table": markdown}``."""
    start = time.time()
    tasks = build_tasks(config)
    base = pretrained_setup(config, tasks)
    common.log(f"{config.backbone}: {base.pretrain_log['parameters'] / 1e6:.2f}M parameters, tasks "
               f"{[(t.name, len(t.splits['train'][1])) for t in tasks]} ({time.time() - start:.1f} s)")
    hooks = row_hooks(config)
    results, table = {}, ""
    for seed in config.seeds:
        results[seed] = run_seed(config, base.trainers, base.trunk, base.pretrained, tasks, seed, base.cache_dir, hooks)
        table = write_report(config, results, tasks, base.pretrain_log, time.time() - start, argv)
    return {"results": results, "tasks": [t.name for t in tasks], "table": table}


def main(argv=None):
    argv = common.argv_or_sys(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--seeds", default="", help="comma-separated, e.g. 0,1,2 (default: the config's)")
    parser.add_argument("--smoke", action="store_true", help="two tasks, a few steps, tiny inputs (tests)")
    args, rest = parser.parse_known_args(argv)
    overrides = common.config_overrides(parser, rest)
    config = get_config(args.model, args.smoke)
    apply_overrides(config, overrides, free_form=())
    if args.seeds:
        config.seeds = tuple(int(s) for s in args.seeds.split(","))
    print(run_benchmark(config, argv)["table"])


if __name__ == "__main__":
    common.run_main(main)
