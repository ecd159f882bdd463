"""The ViT merging benchmark's report: accuracy tables (mean ± std over seeds), the caption with
the setup, the task-vector diagnostics and the selected hyperparameters; written as
``config.out`` + ``.md`` / ``.json``."""

from __future__ import annotations

import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.merging.rows import PER_TASK_ROWS
from mtl_jax.models.trunks import ViT


def markdown_table(results: dict, names: Sequence[str], key: str) -> str:
    """One row per method: per-task and average ``key`` ("acc" / "normalised") in %, mean ± std over
    seeds (the average is taken per seed, then over seeds)."""
    seeds = list(results)
    rows = [n for n in results[seeds[0]] if not n.startswith("_")]
    lines = ["| method | " + " | ".join(names) + " | avg |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        per_seed = np.array([results[s][row][key] for s in seeds])  # [S, T]
        cells = [common.mean_std(per_seed[:, t], scale=100, digits=1) for t in range(len(names))]
        cells.append(common.mean_std(per_seed.mean(axis=1), scale=100, digits=1))
        label = f"{row} (per-task models)" if row in PER_TASK_ROWS else row
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption(config, tasks, pretrain_log: dict, wall: float) -> str:
    sizes = ", ".join(f"{t.name} {len(t.splits['train'][1])}/{len(t.splits['val'][1])}/{len(t.splits['test'][1])}"
                      for t in tasks)
    m = config.model
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        jax.eval_shape(ViT(**m).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))))
    tuned = "backbone (head frozen at the probe)" if config.freeze_heads else "backbone + head"
    return (
        f"ViT ({num_params / 1e6:.2f}M parameters; patch {m.patch_size}, dim {m.dim}, {m.depth} blocks, "
        f"{m.num_heads} heads, MLP {m.mlp_dim}; "
        f"28x28 inputs, {(28 // m.patch_size) ** 2} tokens) pretrained by rotation prediction on "
        f"{pretrain_log['pretext_images']} unlabelled train images x 4 rotations ({config.pretrain.steps} steps, batch "
        f"{config.pretrain.batch_size}; pretext loss {pretrain_log['loss_first']:.2f} -> {pretrain_log['loss_last']:.2f}). "
        f"Tasks (train/val/test): {sizes}. Pretrained = linear probe on the frozen trunk ({config.probe.steps} "
        f"full-batch Adam steps), standing in for CLIP's zero-shot head; individual = {tuned} fine-tuned "
        f"from the probe ({config.finetune.steps} steps, batch {config.finetune.batch_size}, AdamW "
        f"{config.finetune.optim.lr} cosine); multi-task = {tuned}, {config.multitask.steps} steps with a batch "
        f"of {config.multitask.batch_size} from every task (sum of losses). Merging acts on the backbone; every task "
        f"keeps its {'probe' if config.freeze_heads else 'fine-tuned'} head. Hyperparameters (lambda, alpha, beta) chosen per seed by mean normalised "
        f"accuracy on {config.merge.val_per_task} validation images per task; TALL masks pick lambda_t per task "
        f"on its own validation images; Fisher / RegMean use {config.merge.stats_examples} train images per task; "
        f"AdaMerging: {config.learned.steps} Adam steps (paper: 500) on batches of {config.learned.batch_per_task} "
        f"unlabelled test images per task from a pool of {config.learned.pool_per_task}; aTLAS: "
        f"{config.learned.atlas_steps} steps on {config.learned.atlas_examples_per_task} labelled validation images "
        f"per task; Self Positioning: {config.learned.sp_steps} SGD steps (lr {config.learned.sp_lr}) on the same "
        f"labelled images, task-wise coefficients from the plain average. Seeds {tuple(config.seeds)} vary probes, "
        f"fine-tuning, multi-task training and DARE (one pretrained trunk, as the papers use one CLIP). Differences "
        f"from the papers' ViT-B/32 setup: a {num_params / 1e6:.2f}M-parameter ViT instead of 88M, self-supervised pretraining on "
        f"~5k digit images instead of CLIP on 400M image-text pairs, "
        f"digit-derived tasks instead of SUN397/Cars/..., linear-probe instead of zero-shot heads"
        f"{'' if config.freeze_heads else ', heads fine-tuned (the papers freeze the text head)'}, attention q/k/v/out viewed as 2-D matrices for TSV-M / Iso / RegMean. "
        f"SLERP is pairwise and not run (Multi-SLERP, uniform weights, is its T-model form). This invocation: {wall / 60:.1f} min wall, {common.cpu_seconds() / 60:.1f} CPU-min "
        f"(2-core machine shared with other jobs; stages loaded from the cache cost neither)."
    )


def task_vector_report(results: dict, names: Sequence[str]) -> str:
    """Mean / max off-diagonal cosine and mean relative norm per seed, then seed 0's cosine matrix."""
    seeds = [s for s in results if "_task_vectors" in results[s]]
    if not seeds:
        return "(not recorded)"
    lines = []
    for s in seeds:
        cos = np.array(results[s]["_task_vectors"]["cosine"])
        off = cos[~np.eye(len(cos), dtype=bool)]
        i, j = np.unravel_index(np.argmax(np.where(np.eye(len(cos), dtype=bool), -np.inf, cos)), cos.shape)
        tv = results[s]["_task_vectors"]
        lines.append(f"- seed {s}: off-diagonal cosine mean {off.mean():.3f} (min {off.min():.3f}, max {off.max():.3f}: "
                     f"{names[i]} / {names[j]}); ||tau_t|| / ||theta_0|| mean {np.mean(tv['relative_norm']):.3f}"
                     + (f"; at TA's lambda {tv['ta_lambda']}: own edit theta_0 + lambda tau_t "
                        f"{100 * np.mean(tv['own_edit_acc']):.1f}%, TA merge {100 * np.mean(tv['ta_acc']):.1f}%, "
                        f"predictions that differ {100 * np.mean(tv['disagreement']):.1f}%" if "disagreement" in tv else ""))
    cos = np.array(results[seeds[0]]["_task_vectors"]["cosine"])
    lines += ["", f"Cosine matrix, seed {seeds[0]}:", "", "| | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for n, row in zip(names, cos)]
    return "\n".join(lines)


def result_sections(results: dict, names: Sequence[str]) -> list[str]:
    """The report sections every merging experiment shares: absolute and normalised accuracy, the task
    vectors, and each row's selected hyperparameters per seed (headings and bodies, in order)."""
    first = results[next(iter(results))]
    return [
        "## Absolute test accuracy (%)",
        markdown_table(results, names, "acc"),
        "## Normalised accuracy (% of the individual fine-tuned model on each task)",
        markdown_table(results, names, "normalised"),
        "## Task vectors (backbone)",
        task_vector_report(results, names),
        "## Selected hyperparameters per seed",
        "\n".join(f"- {row}: " + "; ".join(f"seed {s}: {json.dumps(results[s][row]['hparams'])}"
                                           for s in results if row in results[s])
                  for row in first if not row.startswith("_") and first[row]["hparams"]),
    ]


def write_report(config, results: dict, tasks, pretrain_log: dict, wall: float, argv: Sequence[str] = ()) -> str:
    """The report as markdown (``config.out`` + ``.md``, ending with the command line ``argv`` of
    ``python -m experiments.merging.run``) and every row as JSON (``config.out`` + ``.json``)."""
    names = [t.name for t in tasks]
    text = "\n\n".join([
        "# ViT model merging on 8 real-digit tasks",
        caption(config, tasks, pretrain_log, wall),
        *result_sections(results, names),
        common.produced_by("experiments.merging.run", argv),
    ]) + "\n"
    common.write_text(config.out + ".md", text)
    common.write_json(config.out + ".json", {
        "config": config.to_dict(), "pretrain": pretrain_log, "wall_seconds": wall,
        "process_cpu_seconds": common.cpu_seconds(),
        "results": {str(s): r for s, r in results.items()}}, indent=1, default=float)
    return text
