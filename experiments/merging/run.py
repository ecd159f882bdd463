"""Real-data ViT merging benchmark: pretrain, probe, fine-tune per task, train multi-task, merge.

    nice -n 10 python -m experiments.merging.run                                   # 8 tasks, 3 seeds
    python -m experiments.merging.run --config=configs/merge/vit_benchmark.py:smoke  # seconds
    python -m experiments.merging.run --config.seeds='(0,)' --config.finetune.steps=100

The analogue, at CPU scale, of the ViT-B/32 8-task tables of task arithmetic / TIES / AdaMerging /
TALL masks: a small ViT (``mtl_jax.models.trunks.ViT``, blocks ``block_{i}``) is pretrained by
rotation prediction (Gidaris et al. 2018) on the union of the unlabelled train images, so it never
sees a task label; every task gets a linear probe on the frozen trunk (the "pretrained" row, in
place of CLIP's zero-shot head), then backbone + head are fine-tuned from there (LP-FT, Kumar et al.
2022) into one model per task. Merging acts on the backbone only; each task keeps its fine-tuned
head. Stages are cached as .npz under ``config.workdir`` (keyed by a hash of the settings they
depend on), so re-running only re-merges. Writes ``config.out`` + ``.md`` / ``.json``.

Modules: ``tasks`` (the 8 digit tasks), ``training`` (pretraining, probes, fine-tuning, multi-task
training), ``statistics`` (accuracy, merge space, Fisher / RegMean inputs, task-vector
diagnostics), ``rows`` (every row of one seed), ``report`` (the tables); this one runs them.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from experiments import common
from experiments.merging.report import write_report
from experiments.merging.rows import run_seed
from experiments.merging.training import setup

CONFIG = os.path.join(common.CONFIGS, "merge", "vit_benchmark.py")


def run_benchmark(config, argv: Sequence[str] = ()) -> dict:
    """The whole pipeline for ``config`` (see configs/merge/vit_benchmark.py); ``argv``: the command
    line, for the report's footer. Returns ``{"results": {seed: rows}, "tasks": names, "table": markdown}``."""
    start = time.time()
    base = setup(config)
    common.log(f"pretrained trunk: {base.pretrain_log} ({time.time() - start:.1f} s since start)")
    tasks = base.tasks
    cache_dir = os.path.join(base.cache_dir, common.settings_hash([(t.name, len(t.splits["train"][1])) for t in tasks]))
    results = {s: run_seed(config, base.trainers, base.trunk, base.pretrained, tasks, s, cache_dir) for s in config.seeds}
    table = write_report(config, results, tasks, base.pretrain_log, time.time() - start, argv)
    return {"results": results, "tasks": [t.name for t in tasks], "table": table}


def main(argv=None):
    argv = common.argv_or_sys(argv)
    config = common.parse_config_file(argv, __doc__.splitlines()[0], CONFIG)
    print(run_benchmark(config, argv)["table"])


if __name__ == "__main__":
    common.run_main(main)
