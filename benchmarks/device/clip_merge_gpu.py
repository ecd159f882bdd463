"""The CLIP ViT-B/32 8-task merging suite's merge + evaluation on one GPU, given the checkpoints.

    python -m benchmarks.device.clip_merge_gpu --layout hf \\
        --pretrained /ckpt/clip-vit-base-patch32/model.safetensors \\
        --tokenizer /ckpt/clip-vit-base-patch32/tokenizer.json --data_root /data \\
        --finetuned_pattern '/ckpt/clip-vit-base-patch32_{task}/model.safetensors'
    python -m benchmarks.device.clip_merge_gpu --smoke   # generated tiny fixtures, CPU, all 8 tasks

Runs ``experiments.merging.clip_suite`` (configs/merge/clip_vit_b32_8tasks.py) and prints the table.
To fit 10 minutes on one H100 it evaluates a fixed random subset of ``--max_test`` test images per
task (default 2000; 0 = the full test sets, ~87k images) and the rows in ``--methods`` (default:
the methods of the published tables; ``all`` = every row). Images are decoded once into
``--cache_dir`` (uint8, ~150 KB per image), so a second run skips decoding.
"""

from __future__ import annotations

import argparse
import time

from experiments import common
from experiments.merging import clip_suite
from mtl_jax.config import config_from_file
from mtl_jax.merging.zero_shot import DATASETS

PUBLISHED_ROWS = ("Weight averaging", "Task arithmetic", "TIES", "Fisher", "RegMean", "Consensus TA", "TSV-M",
                  "Iso-C", "Iso-CTS", "AdaMerging (task-wise)", "AdaMerging (layer-wise)",
                  "AdaMerging++ (layer-wise)", "TALL-mask retrieval", "EMR")
SMOKE_ROWS = ("Task arithmetic", "TIES", "AdaMerging (layer-wise)", "TALL-mask retrieval", "EMR")


def build_config(args):
    config = config_from_file(clip_suite.CONFIG + (f":smoke,layout={args.layout}" if args.smoke else
                                                   f":layout={args.layout}"))
    if not args.smoke:
        for key in ("pretrained", "tokenizer", "data_root"):
            if not getattr(args, key):
                raise SystemExit(f"--{key} is required (or --smoke)")
        if not args.finetuned_pattern:
            raise SystemExit("--finetuned_pattern is required, e.g. '/ckpt/clip-vit-base-patch32_{task}/model.safetensors'")
        config.pretrained, config.tokenizer, config.data_root = args.pretrained, args.tokenizer, args.data_root
        for task in DATASETS:
            config.finetuned[task] = args.finetuned_pattern.format(task=task)
        config.max_test = args.max_test
        config.cache_dir, config.out = args.cache_dir, args.out
    if args.tasks:
        config.tasks = tuple(args.tasks.split(","))
    if args.methods == "all":
        config.methods = ()
    else:
        config.methods = tuple(args.methods.split(",")) if args.methods else (SMOKE_ROWS if args.smoke else PUBLISHED_ROWS)
    if args.adamerging_steps:
        config.learned.steps = args.adamerging_steps
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny generated fixtures (CPU)")
    parser.add_argument("--layout", default="open_clip", choices=("open_clip", "hf"))
    parser.add_argument("--pretrained", default="")
    parser.add_argument("--tokenizer", default="")
    parser.add_argument("--data_root", default="")
    parser.add_argument("--finetuned_pattern", default="", help="checkpoint path with {task} (sun397, cars, ...)")
    parser.add_argument("--tasks", default="", help="comma-separated subset (default: all 8)")
    parser.add_argument("--methods", default="", help="comma-separated row names, or 'all'")
    parser.add_argument("--max_test", type=int, default=2000)
    parser.add_argument("--adamerging_steps", type=int, default=0, help="0: the config's (500)")
    parser.add_argument("--cache_dir", default="runs/clip_suite/cache")
    parser.add_argument("--out", default="runs/clip_suite/clip_vit_b32_8tasks_gpu")
    argv = common.argv_or_sys(argv)
    args = parser.parse_args(argv)
    import jax

    start = time.time()
    config = build_config(args)
    result = clip_suite.run_suite(config, argv, module="benchmarks.device.clip_merge_gpu")
    print(result["table"])
    print(f"device {jax.devices()[0].device_kind}: {time.time() - start:.0f} s wall; table in {config.out}.md")
    return result


if __name__ == "__main__":
    common.run_main(main)
