"""``mtl-jax merge --config configs/merge/<file>.py[:arg] [--config.key=value ...] [--overwrite]``.

(``mtl-jax merge --mergekit-yaml FILE OUT_DIR``: a MergeKit YAML, :mod:`mtl_jax.merging.mergekit.run`.)

The config (``get_config(arg) -> ConfigDict``) names the inputs, the method and the output:

* ``pretrained``: a ``.safetensors`` file or an orbax checkpoint dir; ``finetuned``: a tuple of
  such paths, or ``model_pool``: a directory whose ``*.safetensors`` files other than
  ``pretrained`` (a path, or a file name inside the pool) are the fine-tuned models, sorted.
  A path that does not exist is refused, naming it.
* ``method``: a key of :data:`mtl_jax.merging.streaming.STREAMING_METHODS` (streamed leaf by
  leaf) or, with ``streaming=False``, any data-free key of :data:`mtl_jax.merging.MERGE_METHODS`
  (all models loaded, the method jitted). ``hparams``: the method's keyword arguments, checked
  against its signature before anything is read; DARE's ``key`` comes from ``hparams.seed``.
* ``output`` and ``output_format`` ("" = from the extension: ``.safetensors`` else orbax),
  ``memory_budget`` in bytes (0: one leaf at a time), ``progress`` (tqdm bar per pass),
  ``threads`` (worker threads of the streaming numpy kernels; 0 = every core this process may use).
* ``allow_nonfinite`` (default False, may be absent from the file): merge inputs that hold NaN /
  inf; otherwise the first such tensor is refused, naming its file, and nothing is written.
* ``smoke_pool``: if set, a tiny random pool (``smoke_num_tasks`` models) is written there first,
  so a ``:smoke`` config runs end to end with no checkpoints at hand (it replaces only files of an
  earlier smoke pool).

Output rules (checked before anything is read or written; :mod:`mtl_jax.merging.output_safety`):

* refused always: an output that is an input, contains an input (e.g. the model pool, or ``.``
  when the inputs are below it), lies inside an input, or is the current directory or above it;
* an existing output is replaced only if a merge of ours wrote it (a safetensors file with
  ``mtl_jax.merge`` in its ``__metadata__``, an orbax dir holding ``mtl_jax_merge.json``), or
  with the ``--overwrite`` flag (a flag, not a config key: it never sits in a config file);
* the output is written to a hidden temporary sibling, fsynced and renamed into place; an output
  being replaced is removed only after the new one is complete, and a failed merge leaves none.

Every bad input (config, path, file, hyperparameter, non-finite value) raises a
:class:`mtl_jax.errors.UsageError` with a one-line message (exit 2 at the command line).
Prints one JSON line with the merge statistics.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mtl_jax.errors import UsageError
from mtl_jax.merging.input_checks import FiniteCheck, check_hparams, check_inputs_exist
from mtl_jax.merging.output_safety import check_output
from mtl_jax.merging.safetensors_header import has_metadata_key

if TYPE_CHECKING:
    from ml_collections import ConfigDict

# In-memory methods that need no data (Fisher / RegMean need gradients or activations).
IN_MEMORY_METHODS = ("weight_average", "task_arithmetic", "ties", "dare", "consensus", "lines", "tsv", "iso_c", "iso_cts", "slerp", "model_stock")
FREE_FORM = ("hparams",)
DEFAULTS = {"allow_nonfinite": False}  # keys a merge config file may leave out
SMOKE_MARKER = "mtl_jax.smoke_pool"


def _streaming():
    """:mod:`mtl_jax.merging.streaming` (imported here: it imports JAX, which ``--mergekit-yaml`` does not need)."""
    from mtl_jax.merging import streaming

    return streaming


def valid_methods(streaming: bool) -> tuple[str, ...]:
    return tuple(sorted(_streaming().STREAMING_METHODS)) if streaming else IN_MEMORY_METHODS


def load_merge_config(spec: str, overrides: list[str] = ()) -> ConfigDict:
    """``'configs/merge/x.py[:arg]'`` -> ConfigDict with ``--config.`` overrides applied (unknown keys
    fail with the valid ones, except inside the free-form ``hparams`` section)."""
    from mtl_jax.config import apply_overrides, config_from_file

    config = config_from_file(spec)
    with config.unlocked():
        for key, value in DEFAULTS.items():
            if key not in config:
                config[key] = value
    return apply_overrides(config, list(overrides), free_form=FREE_FORM)


def make_smoke_pool(directory: str, num_tasks: int = 3, seed: int = 0) -> None:
    """Write ``pretrained.safetensors`` and ``task_{t}.safetensors`` (a tiny 2-block MLP-like flat
    dict, fp32, deltas of scale 0.01) into ``directory``. A file of that name already there is
    kept if it holds the same tensors, replaced if an earlier smoke pool wrote it, and otherwise
    refused (UsageError) before anything is written."""
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (32, 16), "head.weight": (16, 4), "head.bias": (4,)}
    for b in range(2):
        shapes.update({f"blocks.{b}.mlp.weight": (16, 16), f"blocks.{b}.mlp.bias": (16,), f"blocks.{b}.norm.scale": (16,)})
    p0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    files = {os.path.join(directory, "pretrained.safetensors"): p0}
    for t in range(num_tasks):
        ft = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()}
        files[os.path.join(directory, f"task_{t}.safetensors")] = ft
    todo = {path: tree for path, tree in files.items() if not _holds(path, tree)}
    for path in todo:
        if os.path.lexists(path) and not has_metadata_key(path, SMOKE_MARKER):
            raise UsageError(f"smoke_pool: '{path}' exists and is not a smoke-pool file; name another smoke_pool")
    os.makedirs(directory, exist_ok=True)
    for path, tree in todo.items():
        _streaming().save_safetensors(tree, path, {SMOKE_MARKER: "1"})


def _holds(path: str, tree: dict[str, np.ndarray]) -> bool:
    """Whether ``path`` is a safetensors file holding exactly ``tree``."""
    try:
        old = _streaming().load_safetensors(path)
    except (OSError, UsageError):
        return False
    return sorted(old) == sorted(tree) and all(np.array_equal(old[k], tree[k]) for k in tree)


def resolve_inputs(config: ConfigDict) -> tuple[str, list[str]]:
    """(pretrained path, fine-tuned paths) from ``pretrained`` + ``finetuned`` or ``model_pool``."""
    pool = config.get("model_pool", "")
    pretrained = config.pretrained
    if pool:
        if not os.path.isdir(pool):
            raise UsageError(f"config.model_pool '{pool}' is not a directory")
        if not os.path.exists(pretrained):
            pretrained = os.path.join(pool, pretrained)
        finetuned = [
            f for f in sorted(glob.glob(os.path.join(pool, "*.safetensors")))
            if os.path.abspath(f) != os.path.abspath(pretrained)
        ]
    else:
        finetuned = list(config.finetuned)
    if not finetuned:
        raise UsageError("no fine-tuned checkpoints: set config.finetuned or config.model_pool")
    check_inputs_exist([("config.pretrained", pretrained)] + [("config.finetuned", f) for f in finetuned])
    return pretrained, finetuned


def merge_hparams(config: ConfigDict) -> dict[str, Any]:
    """The method's keyword arguments; DARE's PRNG key from ``hparams.seed`` (default 0)."""
    from ml_collections import ConfigDict

    hp = dict(config.hparams.to_dict()) if isinstance(config.hparams, ConfigDict) else dict(config.hparams)
    if config.method == "dare":
        import jax

        hp["key"] = jax.random.key(int(hp.pop("seed", 0)))
    return hp


def method_fn(method: str, streaming: bool) -> Callable:
    """The in-memory merge function of ``method``, whose signature names the hyperparameters of
    both paths (UsageError listing the methods valid for ``streaming``)."""
    if method not in valid_methods(streaming):
        raise UsageError(f"unknown merge method {method!r} for streaming={streaming}; "
                         f"valid: {', '.join(valid_methods(streaming))}")
    from mtl_jax.merging import get_merge_method

    return get_merge_method(method)


def in_memory_merge(pretrained: str, finetuned: list[str], config: ConfigDict, hp: dict[str, Any],
                    overwrite: bool = False) -> dict[str, Any]:
    """Load every model, run the jitted in-memory method, write the output (T + 2 models in memory)."""
    import jax

    S = _streaming()
    start = time.perf_counter()
    labels = S.input_labels(len(finetuned))
    readers = S.open_inputs([pretrained] + finetuned)
    try:
        names = S.check_specs(readers, labels)
        specs = [readers[0].specs[n] for n in names]
        trees = [r.read_group(names) for r in readers]
        if not config.get("allow_nonfinite", False):
            FiniteCheck([f"{r.path} ({label})" for r, label in zip(readers, labels)], names).group(trees[0], trees[1:])
    finally:
        for r in readers:
            r.close()
    merged = jax.jit(functools.partial(method_fn(config.method, streaming=False), **hp))(trees[0], trees[1:])
    fmt = S.output_format_of(config.output, config.output_format or None)
    writer = S.open_output(config.output, fmt, specs, config.method, overwrite=overwrite)
    try:
        for n in names:
            writer.write(n, np.asarray(merged[n]))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return {"method": config.method, "num_leaves": len(names), "passes": 1, "seconds": time.perf_counter() - start}


def run_merge(config: ConfigDict, overwrite: bool = False) -> dict[str, Any]:
    """Run the merge a config describes; returns its statistics. Everything the user named is
    checked first (method, hyperparameters, input paths, the output path: see the module
    docstring); ``overwrite`` lets an existing output that is not ours be replaced."""
    S = _streaming()
    streaming = bool(config.get("streaming", True))
    fn = method_fn(config.method, streaming)
    hp = merge_hparams(config)
    dare = {"key": "seed"} if config.method == "dare" else {}
    check_hparams(fn, [dare.get(k, k) for k in hp], 2, f"merge method {config.method!r}", rename=dare)
    if config.get("smoke_pool", ""):
        check_output(config.output, [("smoke_pool", config.smoke_pool)], overwrite)
        make_smoke_pool(config.smoke_pool, config.get("smoke_num_tasks", 3))
    pretrained, finetuned = resolve_inputs(config)
    fmt = S.output_format_of(config.output, config.output_format or None)
    check_output(config.output, list(zip(S.input_labels(len(finetuned)), [pretrained] + finetuned)), overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    if not streaming:
        return in_memory_merge(pretrained, finetuned, config, hp, overwrite)
    return S.stream_merge(
        pretrained,
        finetuned,
        config.output,
        config.method,
        memory_budget=int(config.memory_budget) or None,
        output_format=fmt,
        progress=bool(config.progress),
        threads=int(config.get("threads", 0)) or None,
        overwrite=overwrite,
        allow_nonfinite=bool(config.get("allow_nonfinite", False)),
        **hp,
    )


def main(argv: list[str]) -> None:
    """``merge --config FILE[:arg] [--config.key=value ...] [--overwrite]`` (``argv`` may start
    with 'merge')."""
    argv = list(argv)
    if argv and argv[0] == "merge":
        argv = argv[1:]
    if any(a == "--mergekit-yaml" or a.startswith("--mergekit-yaml=") for a in argv):
        from mtl_jax.merging.mergekit.run import main as mergekit_main

        return mergekit_main(argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="mtl-jax merge", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/merge/<file>.py[:arg], e.g. configs/merge/ties_example.py:smoke")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output that is not a previous merge output (never an input)")
    args = parser.parse_args(rest)
    config = load_merge_config(args.config, overrides)
    stats = run_merge(config, overwrite=args.overwrite)
    stats["output"] = os.path.abspath(config.output)
    print(json.dumps(stats))
