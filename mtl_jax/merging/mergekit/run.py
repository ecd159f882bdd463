"""``mtl-jax merge --mergekit-yaml FILE OUT_DIR [--overwrite] [--max-shard-size BYTES] [--random-seed N]``.

Runs a MergeKit YAML (:mod:`mtl_jax.merging.mergekit.config`) tensor by tensor and writes a
Hugging Face model folder: ``model-0000i-of-0000n.safetensors`` shards (``__metadata__``
``{"format": "pt"}``), ``model.safetensors.index.json``, the donor's (base model's, else the
first model's) ``config.json`` with ``num_hidden_layers`` (slices) and the dtype updated, its
tokenizer files, the YAML as ``mergekit_config.yml``, and ``mtl_jax_merge.json`` (the marker
that lets a later merge replace this folder without ``--overwrite``).

Everything is checked before anything is written (keys, method, parameters, model folders,
architectures, vocab sizes, shapes, layer ranges; the output path by
:func:`mtl_jax.merging.output_safety.check_output`). The folder is built in a hidden temporary
sibling and renamed into place when complete; a failed or interrupted merge leaves no folder at
``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import time
from typing import Any, Optional

import numpy as np

from mtl_jax.errors import UsageError
from mtl_jax.merging.mergekit.config import parse_config
from mtl_jax.merging.mergekit.methods import FUSED_METHODS, Precision, TensorJob, fused_kernels, merge_tensor, phase
from mtl_jax.merging.mergekit.model_folder import TOKENIZER_FILES, ModelFolder
from mtl_jax.merging.mergekit.plan import MergePlan, OutputTensor, _open_models, build_plan
from mtl_jax.merging.output_safety import MARKER_FILE, check_output, commit, discard, fsync_tree, temp_sibling
from mtl_jax.merging.streaming.planning import LeafSpec
from mtl_jax.merging.streaming.safetensors_io import SafetensorsWriter

DEFAULT_SHARD_BYTES = 5_000_000_000  # MergeKit's --out-shard-size default


def shard_plan(tensors: tuple[OutputTensor, ...], max_bytes: int) -> list[list[OutputTensor]]:
    """Consecutive tensors into shards of at most ``max_bytes`` (a larger tensor alone), as
    MergeKit's TensorWriter: a shard is closed when the next tensor would overflow it."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and max_bytes > 0 and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _output_config(plan: MergePlan, models: dict[str, ModelFolder], dtype: Optional[str], out_dtype: Optional[str]) -> dict:
    """The donor's config.json with MergeKit's updates (``_model_out_config``)."""
    config = dict(models[plan.donor].config)
    if out_dtype or dtype:  # transformers >= 5 writes "dtype"; older versions read "torch_dtype"
        config["dtype"] = out_dtype or dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype or dtype
    if plan.layers_changed:
        config["num_hidden_layers"] = plan.num_layers
    return config


def _merge_into(plan: MergePlan, models: dict[str, ModelFolder], folder: str, max_shard_bytes: int, seed: int) -> int:
    """Merge every tensor and write the shards + index into ``folder``; returns total bytes."""
    shards = shard_plan(plan.tensors, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    # two output buffers, alternating: a tensor is merged into one while the other is written
    # (reused pages: no fresh allocation, i.e. no page zeroing, per tensor)
    largest = max((t.nbytes for t in plan.tensors), default=0)
    buffers = [np.empty(largest, np.uint8) for _ in range(2)]
    turn = 0
    io = concurrent.futures.ThreadPoolExecutor(1)
    pending: list[concurrent.futures.Future] = []
    try:
        for i, shard in enumerate(shards):
            name = shard_name(i, len(shards))
            specs = [LeafSpec(t.name, t.shape, t.out_dtype) for t in shard]
            writer = SafetensorsWriter(os.path.join(folder, name), specs, {"format": "pt"})
            try:
                for j, t in enumerate(shard):
                    nxt = shard[j + 1] if j + 1 < len(shard) else None
                    for m, n in nxt.inputs if nxt else ():
                        models[m].prefetch(n)
                    out = buffers[turn][: t.nbytes].view(t.out_dtype)
                    turn = 1 - turn
                    views = [models[m].view(n) for m, n in t.inputs]
                    job = TensorJob(t.name, views, t.base, t.shared, list(t.per_input), Precision(t.work_dtype), out, t.shape, seed)
                    merge_tensor(plan.method, job)
                    del views, job
                    for m, n in t.inputs:
                        models[m].release(n)
                    with phase("write_wait"):
                        while pending:  # the previous tensor is written while this one merges
                            pending.pop(0).result()
                    pending.append(io.submit(writer.write, t.name, out.reshape(t.shape)))
                    weight_map[t.name] = name
                    total += t.nbytes
                for f in pending:
                    f.result()
                pending.clear()
                writer.close()
            except BaseException:
                for f in pending:
                    f.cancel()
                concurrent.futures.wait(pending)
                pending.clear()
                writer.abort()
                raise
    finally:
        io.shutdown(wait=True)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def run_mergekit_yaml(yaml_path: str, out_dir: str, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      seed: int = 0) -> dict[str, Any]:
    """Run the MergeKit YAML at ``yaml_path`` into the model folder ``out_dir``; returns stats.
    ``seed``: of the DARE keep masks. Raises UsageError (one line) on bad input, before writing."""
    start = time.perf_counter()
    try:
        with open(yaml_path) as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read the mergekit yaml '{yaml_path}': {e.strerror}") from None
    cfg = parse_config(text)
    if cfg.merge_method in FUSED_METHODS:
        fused_kernels()  # starts importing numba in the background
    check_output(out_dir, [(f"model '{p}'", p) for p in cfg.referenced_models()] + [("mergekit yaml", yaml_path)], overwrite)
    models = _open_models(cfg)
    tmp = None
    try:
        plan = build_plan(cfg, models)
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        tmp = temp_sibling(out_dir)
        os.mkdir(tmp)
        total = _merge_into(plan, models, tmp, max_shard_bytes, seed)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_output_config(plan, models, cfg.dtype, cfg.out_dtype), f, indent=2)
        for name in TOKENIZER_FILES:
            src = os.path.join(plan.donor, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        with open(os.path.join(tmp, "mergekit_config.yml"), "w") as f:
            f.write(text)
        with open(os.path.join(tmp, MARKER_FILE), "w") as f:
            json.dump({"written_by": "mtl_jax merge --mergekit-yaml", "method": cfg.merge_method}, f)
        fsync_tree(tmp)
        commit(tmp, out_dir, overwrite)
        tmp = None
    finally:
        if tmp is not None:
            discard(tmp)
        for m in models.values():
            m.close()
    return {"method": cfg.merge_method, "num_tensors": len(plan.tensors), "num_layers": plan.num_layers,
            "bytes": total, "seconds": time.perf_counter() - start}


def _size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    text = text.strip().upper()
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5000000000, 5B, 500M)") from None


def main(argv: list[str]) -> None:
    """``--mergekit-yaml FILE OUT_DIR [--overwrite] [--max-shard-size N] [--random-seed N]``
    (``argv`` may start with 'merge')."""
    argv = list(argv)
    if argv and argv[0] == "merge":
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="mtl-jax merge --mergekit-yaml", description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-yaml", nargs=2, metavar=("FILE", "OUT_DIR"), required=True,
                        help="a MergeKit YAML and the model folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT_DIR that is not a previous merge output (never an input)")
    parser.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD_BYTES,
                        help="bytes per output shard (default 5B, as MergeKit)")
    parser.add_argument("--random-seed", type=int, default=0, help="seed of the DARE keep masks")
    args = parser.parse_args(argv)
    yaml_path, out_dir = args.mergekit_yaml
    stats = run_mergekit_yaml(yaml_path, out_dir, args.overwrite, args.max_shard_size, args.random_seed)
    stats["output"] = os.path.abspath(out_dir)
    print(json.dumps(stats))


__all__ = ["main", "run_mergekit_yaml", "shard_plan"]
