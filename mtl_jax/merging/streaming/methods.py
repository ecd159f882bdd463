"""The streaming merge methods and :func:`stream_merge`, which runs one of them on checkpoints on
disk.

A streaming method is ``stream_<name>(stream, writer, hp)``: ``hp`` holds the in-memory method's
hyperparameters as its own module checks them (e.g. :class:`mtl_jax.merging.ties.TiesHParams`),
so names, defaults and checks are the in-memory method's. Each gives the in-memory result (tests:
streaming == in-memory); per-leaf methods read every input once, methods with model-wide
statistics (global TIES thresholds, majority sign, LiNeS norms) read them once per statistic
first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np

from mtl_jax.errors import UsageError
from mtl_jax.merging.arithmetic import (
    TaskArithmeticHParams,
    WeightAverageHParams,
    normalized_weights,
    per_task_weights,
    task_arithmetic,
    weight_average,
)
from mtl_jax.merging.input_checks import FiniteCheck, check_hparams, check_inputs_exist, with_defaults
from mtl_jax.merging.lines import LinesHParams, count_blocks, lines_merging, lines_scale
from mtl_jax.merging.masks import ConsensusHParams, consensus_merging
from mtl_jax.merging.output_safety import check_output
from mtl_jax.merging.streaming.cores import hparams_key, run_pass, write_group, write_pass
from mtl_jax.merging.streaming.formats import input_labels, open_inputs, open_output, output_format_of
from mtl_jax.merging.streaming.kernels import chunk_kernel
from mtl_jax.merging.streaming.passes import chunk_pass, default_threads
from mtl_jax.merging.streaming.planning import Stream, check_specs, leaf_working_set, plan_groups
from mtl_jax.merging.streaming.ties_global import stream_ties_global
from mtl_jax.merging.streaming.ties_threshold import ties_statistics
from mtl_jax.merging.task_vectors import apply_task_vector
from mtl_jax.merging.ties import DareHParams, TiesHParams, dare_merging, ties_merging
from mtl_jax.registry import lookup


def stream_weight_average(stream: Stream, writer: Any, hp: WeightAverageHParams) -> None:
    """:func:`mtl_jax.merging.arithmetic.weight_average`, one pass (chunk kernel)."""
    kernel = chunk_kernel("weight_average_kernel", np.asarray(normalized_weights(hp.weights, stream.num_tasks)))
    chunk_pass(stream, "merge", lambda: kernel, writer)


def stream_task_arithmetic(stream: Stream, writer: Any, hp: TaskArithmeticHParams) -> None:
    """:func:`mtl_jax.merging.arithmetic.task_arithmetic` (Ilharco et al. 2023), one pass (chunk
    kernel); ``lam`` a scalar or per task."""
    kernel = chunk_kernel("task_arithmetic_kernel", np.asarray(per_task_weights(hp.lam, stream.num_tasks)))
    chunk_pass(stream, "merge", lambda: kernel, writer)


def stream_ties(stream: Stream, writer: Any, hp: TiesHParams) -> None:
    """:func:`mtl_jax.merging.ties.ties_merging` (Yadav et al. 2023). Global top-k: two passes
    (:func:`mtl_jax.merging.streaming.ties_global.stream_ties_global`); ``per_tensor``: a
    majority-sign pass + the output pass."""
    if not hp.per_tensor:
        stream_ties_global(stream, writer, hp.top_k, hp.lam)
        return
    dyn = ties_statistics(stream, "per_tensor", hp.top_k)
    write_pass(stream, writer, "ties", dyn, hparams_key(trim="per_tensor", top_k=hp.top_k, lam=hp.lam))


def stream_dare(stream: Stream, writer: Any, hp: DareHParams) -> None:
    """:func:`mtl_jax.merging.ties.dare_merging` (Yu et al. 2024), the same keep masks
    (:func:`mtl_jax.merging.ties.dare_keep`, leaf i = i-th name in sorted order).
    ``combine="ta"``: one pass (chunk kernel); ``"ties"``: majority-sign pass + output pass."""
    if hp.combine == "ta":
        kernel = chunk_kernel("dare_ta_kernel", hp.key, hp.p, np.asarray(per_task_weights(hp.lam, stream.num_tasks)))
        chunk_pass(stream, "merge", lambda: kernel, writer)
        return
    dyn = ties_statistics(stream, "dare", key=hp.key, p=hp.p)
    write_pass(stream, writer, "ties", dyn, hparams_key(trim="dare", p=hp.p, lam=hp.lam))


def stream_consensus(stream: Stream, writer: Any, hp: ConsensusHParams) -> None:
    """:func:`mtl_jax.merging.masks.consensus_merging` (Wang et al. 2024). ``base="ta"``: the
    TALL/consensus counts are per entry, one pass (chunk kernel); ``base="ties"``: the TIES
    threshold and majority passes first."""
    if hp.base == "ta":
        tall = np.asarray(per_task_weights(hp.tall_lambda, stream.num_tasks))
        kernel = chunk_kernel("consensus_ta_kernel", hp.k, tall, hp.lam)
        chunk_pass(stream, "merge", lambda: kernel, writer)
        return
    dyn = ties_statistics(stream, "global", hp.top_k)
    core_hp = hparams_key(trim="global", top_k=hp.top_k, k=hp.k, tall_lambda=hp.tall_lambda, lam=hp.lam)
    write_pass(stream, writer, "consensus_ties", dyn, core_hp)


def stream_lines(stream: Stream, writer: Any, hp: LinesHParams) -> None:
    """:func:`mtl_jax.merging.lines.lines_merging` (Wang et al. 2025): a pass for the L1 norms of
    ``sum_t tau_t`` and tau_merged (alpha), then the output pass (TIES base: TIES passes first).
    The layer scaling reads leaf names, so it runs eagerly after the jitted merged vector."""
    num_blocks = count_blocks(stream.names, hp.num_blocks, hp.layer_index_fn)
    dyn = ties_statistics(stream, "global", hp.top_k) if hp.base == "ties" else {}
    core_hp = hparams_key(base=hp.base, trim="global", top_k=hp.top_k)
    norm_sum, norm_merged = 0, 0
    for _, out in run_pass(stream, "lines norms", "lines_norms", dyn, core_hp):
        for n in out:  # leaf by leaf, in order: the same fp32 additions as tree_l1_norm
            norm_sum, norm_merged = norm_sum + out[n][0], norm_merged + out[n][1]
    alpha = norm_sum / norm_merged / stream.num_tasks
    for p0, merged in run_pass(stream, "merge", "merged_vector", dyn, core_hp):
        write_group(writer, apply_task_vector(p0, lines_scale(merged, alpha, hp.beta, num_blocks, hp.layer_index_fn)))


class StreamedMethod(NamedTuple):
    """A merge method that streams: the in-memory function (its signature names the
    hyperparameters and their defaults), the check that turns them into ``hp``, and
    ``stream(stream, writer, hp)``."""

    merge: Callable
    hparams: Callable[..., Any]
    stream: Callable[[Stream, Any, Any], None]


STREAMING_METHODS: dict[str, StreamedMethod] = {
    "weight_average": StreamedMethod(weight_average, WeightAverageHParams, stream_weight_average),
    "task_arithmetic": StreamedMethod(task_arithmetic, TaskArithmeticHParams, stream_task_arithmetic),
    "ties": StreamedMethod(ties_merging, TiesHParams.validated, stream_ties),
    "dare": StreamedMethod(dare_merging, DareHParams.validated, stream_dare),
    "consensus": StreamedMethod(consensus_merging, ConsensusHParams.validated, stream_consensus),
    "lines": StreamedMethod(lines_merging, LinesHParams.validated, stream_lines),
}

# Methods whose output pass patches positions it kept aside (SafetensorsWriter.patch) write
# through the page cache (buffered), where a patch touches cached pages instead of a
# read-modify-write of O_DIRECT blocks; the others write O_DIRECT.
PATCHED_OUTPUT = frozenset({"ties"})


def stream_merge(
    pretrained: Any,
    finetuned: Sequence[Any],
    output: str,
    method: str = "task_arithmetic",
    *,
    memory_budget: Optional[int] = None,
    output_format: Optional[str] = None,
    progress: bool = False,
    mmap: bool = False,
    metadata: Optional[dict[str, str]] = None,
    threads: Optional[int] = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    **hparams: Any,
) -> dict[str, Any]:
    """Merge checkpoints on disk into ``output`` leaf by leaf.

    Args:
      pretrained: path of a ``.safetensors`` file or orbax checkpoint dir (or a reader).
      finetuned: T such paths; every file must have the pretrained leaf names and shapes.
      output: output path; format from ``output_format`` or the ``.safetensors`` extension.
        Refused before anything is read (:func:`mtl_jax.merging.output_safety.check_output`):
        an input, a directory holding one, or an existing path that is not a previous merge
        output unless ``overwrite``. Written to a hidden temporary sibling and renamed into place.
      method: a key of :data:`STREAMING_METHODS`; ``hparams`` are the in-memory method's
        (e.g. ``top_k``, ``lam``; DARE needs ``key``), checked against its signature and by its
        hyperparameter check before anything is read.
      memory_budget: bytes for one group of leaves (None: one leaf at a time).
      progress: tqdm bar over leaves for every pass. mmap: zero-copy safetensors reads.
      threads: worker threads of the numpy kernels (default: the cores this process may use;
        1 = none). The result does not depend on it.
      allow_nonfinite: merge inputs holding NaN / inf (default: refused as they are read,
        :class:`mtl_jax.merging.input_checks.NonFiniteInputError`, and nothing is written).

    Returns stats: ``{"method", "num_leaves", "num_groups", "passes", "seconds"}``.
    Output dtypes are the pretrained dtypes (bf16 stays bf16).
    """
    streamed = lookup(STREAMING_METHODS, method, "streaming merge method")
    if not finetuned:
        raise UsageError("need at least one fine-tuned checkpoint")
    check_hparams(streamed.merge, hparams, 2, f"merge method {method!r}")
    hp = streamed.hparams(**with_defaults(streamed.merge, hparams, 2))
    fmt = output_format_of(output, output_format)
    start = time.perf_counter()
    inputs = [pretrained] + list(finetuned)
    labels = input_labels(len(finetuned))
    check_inputs_exist(list(zip(labels, inputs)))
    check_output(output, list(zip(labels, inputs)), overwrite)
    readers = open_inputs(inputs, mmap)
    try:
        names = check_specs(readers, labels)
        specs = [readers[0].specs[n] for n in names]
        working = [leaf_working_set([r.specs[n] for r in readers], readers[0].specs[n].dtype) for n in names]
        finite = None if allow_nonfinite else FiniteCheck(
            [f"{getattr(r, 'path', label)} ({label})" for r, label in zip(readers, labels)], names)
        stream = Stream(readers[0], readers[1:], names, plan_groups(names, working, memory_budget), progress,
                        threads=threads or default_threads(), memory_budget=memory_budget, finite=finite)
        writer = open_output(output, fmt, specs, method, metadata=metadata, direct=method not in PATCHED_OUTPUT,
                             overwrite=overwrite)
        try:
            streamed.stream(stream, writer, hp)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    finally:
        for r in readers:
            r.close()
    return {
        "method": method,
        "num_leaves": len(names),
        "num_groups": len(stream.groups),
        "passes": stream.passes,
        "seconds": time.perf_counter() - start,
    }
