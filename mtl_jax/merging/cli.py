"""``mtl-jax merge --config configs/merge/<file>.py[:arg] [--config.key=value ...]``.

The config (``get_config(arg) -> ConfigDict``) names the inputs, the method and the output:

* ``pretrained``: a ``.safetensors`` file or an orbax checkpoint dir; ``finetuned``: a tuple of
  such paths, or ``model_pool``: a directory whose ``*.safetensors`` files other than
  ``pretrained`` (a path, or a file name inside the pool) are the fine-tuned models, sorted.
* ``method``: a key of :data:`mtl_jax.merging.streaming.STREAMING_METHODS` (streamed leaf by
  leaf) or, with ``streaming=False``, any data-free key of :data:`mtl_jax.merging.MERGE_METHODS`
  (all models loaded, the method jitted). ``hparams``: the method's keyword arguments; DARE's
  ``key`` comes from ``hparams.seed``.
* ``output`` and ``output_format`` ("" = from the extension: ``.safetensors`` else orbax),
  ``memory_budget`` in bytes (0: one leaf at a time), ``progress`` (tqdm bar per pass),
  ``threads`` (worker threads of the streaming numpy kernels; 0 = every core this process may use).
* ``smoke_pool``: if set, a tiny random pool (``smoke_num_tasks`` models) is written there first,
  so a ``:smoke`` config runs end to end with no checkpoints at hand.

Prints one JSON line with the merge statistics.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import time
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mtl_jax.config import apply_overrides, config_from_file
from mtl_jax.merging import streaming as S

# In-memory methods that need no data (Fisher / RegMean need gradients or activations).
IN_MEMORY_METHODS = ("weight_average", "task_arithmetic", "ties", "dare", "consensus", "lines", "tsv", "iso_c", "iso_cts", "slerp", "model_stock")
FREE_FORM = ("hparams",)


def valid_methods(streaming: bool) -> tuple[str, ...]:
    return tuple(sorted(S.STREAMING_METHODS)) if streaming else IN_MEMORY_METHODS


def load_merge_config(spec: str, overrides: list[str] = ()) -> ConfigDict:
    """``'configs/merge/x.py[:arg]'`` -> ConfigDict with ``--config.`` overrides applied (unknown keys
    fail with the valid ones, except inside the free-form ``hparams`` section)."""
    return apply_overrides(config_from_file(spec), list(overrides), free_form=FREE_FORM)


def make_smoke_pool(directory: str, num_tasks: int = 3, seed: int = 0) -> None:
    """Write ``pretrained.safetensors`` and ``task_{t}.safetensors`` (a tiny 2-block MLP-like flat
    dict, fp32, deltas of scale 0.01) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (32, 16), "head.weight": (16, 4), "head.bias": (4,)}
    for b in range(2):
        shapes.update({f"blocks.{b}.mlp.weight": (16, 16), f"blocks.{b}.mlp.bias": (16,), f"blocks.{b}.norm.scale": (16,)})
    p0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    S.save_safetensors(p0, os.path.join(directory, "pretrained.safetensors"))
    for t in range(num_tasks):
        ft = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()}
        S.save_safetensors(ft, os.path.join(directory, f"task_{t}.safetensors"))


def resolve_inputs(config: ConfigDict) -> tuple[str, list[str]]:
    """(pretrained path, fine-tuned paths) from ``pretrained`` + ``finetuned`` or ``model_pool``."""
    pool = config.get("model_pool", "")
    pretrained = config.pretrained
    if pool:
        if not os.path.isdir(pool):
            raise FileNotFoundError(f"model_pool '{pool}' is not a directory")
        if not os.path.exists(pretrained):
            pretrained = os.path.join(pool, pretrained)
        finetuned = [
            f for f in sorted(glob.glob(os.path.join(pool, "*.safetensors")))
            if os.path.abspath(f) != os.path.abspath(pretrained)
        ]
    else:
        finetuned = list(config.finetuned)
    if not finetuned:
        raise ValueError("no fine-tuned checkpoints: set config.finetuned or config.model_pool")
    return pretrained, finetuned


def merge_hparams(config: ConfigDict) -> dict[str, Any]:
    """The method's keyword arguments; DARE's PRNG key from ``hparams.seed`` (default 0)."""
    hp = dict(config.hparams.to_dict()) if isinstance(config.hparams, ConfigDict) else dict(config.hparams)
    if config.method == "dare":
        import jax

        hp["key"] = jax.random.key(int(hp.pop("seed", 0)))
    return hp


def in_memory_merge(pretrained: str, finetuned: list[str], config: ConfigDict, hp: dict[str, Any]) -> dict[str, Any]:
    """Load every model, run the jitted in-memory method, write the output (T + 2 models in memory)."""
    import jax

    from mtl_jax.merging import get_merge_method

    start = time.perf_counter()
    readers = [S.open_checkpoint(p) for p in [pretrained] + finetuned]
    names = S.check_specs(readers, ["pretrained"] + [f"finetuned[{i}]" for i in range(len(finetuned))])
    trees = [r.read_group(names) for r in readers]
    for r in readers:
        r.close()
    merged = jax.jit(functools.partial(get_merge_method(config.method), **hp))(trees[0], trees[1:])
    specs = [readers[0].specs[n] for n in names]
    fmt = S.output_format_of(config.output, config.output_format or None)
    writer = S.SafetensorsWriter(config.output, specs) if fmt == "safetensors" else S.OrbaxWriter(config.output, specs)
    for n in names:
        writer.write(n, np.asarray(merged[n]))
    writer.close()
    return {"method": config.method, "num_leaves": len(names), "passes": 1, "seconds": time.perf_counter() - start}


def run_merge(config: ConfigDict) -> dict[str, Any]:
    """Run the merge a config describes; returns its statistics."""
    streaming = bool(config.get("streaming", True))
    if config.method not in valid_methods(streaming):
        raise ValueError(
            f"unknown merge method {config.method!r} for streaming={streaming}; "
            f"valid: {', '.join(valid_methods(streaming))}"
        )
    if config.get("smoke_pool", ""):
        make_smoke_pool(config.smoke_pool, config.get("smoke_num_tasks", 3))
    pretrained, finetuned = resolve_inputs(config)
    hp = merge_hparams(config)
    out_dir = os.path.dirname(os.path.abspath(config.output))
    os.makedirs(out_dir, exist_ok=True)
    if not streaming:
        return in_memory_merge(pretrained, finetuned, config, hp)
    return S.stream_merge(
        pretrained,
        finetuned,
        config.output,
        config.method,
        memory_budget=int(config.memory_budget) or None,
        output_format=config.output_format or None,
        progress=bool(config.progress),
        threads=int(config.get("threads", 0)) or None,
        **hp,
    )


def main(argv: list[str]) -> None:
    """``merge --config FILE[:arg] [--config.key=value ...]`` (``argv`` may start with 'merge')."""
    argv = list(argv)
    if argv and argv[0] == "merge":
        argv = argv[1:]
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="mtl-jax merge", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/merge/<file>.py[:arg], e.g. configs/merge/ties_example.py:smoke")
    args = parser.parse_args(rest)
    config = load_merge_config(args.config, overrides)
    stats = run_merge(config)
    stats["output"] = os.path.abspath(config.output)
    print(json.dumps(stats))
