"""Streaming model merging: checkpoints are read and the merged model written leaf by leaf.

A merge of T fine-tuned models then needs memory for about one leaf per input plus the output
leaf, not T + 1 whole models; the result equals the in-memory merge of the loaded flat dicts
(leaves in sorted-name order, the order ``jax.tree_util`` gives a flat ``{name: array}`` dict).
Entry point: :func:`stream_merge`. Modules, one concern each:

* :mod:`.safetensors_io`, :mod:`.orbax_io`: leaf-by-leaf readers and writers of the two
  formats; :mod:`.formats`: which one a path gets.
* :mod:`.planning`: leaf specs, working sets, groups of leaves under ``memory_budget``, the
  :class:`Stream` of one merge.
* :mod:`.passes`: passes over the inputs and the worker threads of the numpy kernels.
* :mod:`.kernels`: numpy kernels over chunks of flat leaves (averaging, task arithmetic, DARE-TA,
  Consensus TA); :mod:`.fused`: the same kernels and the global TIES output fused in numba (used
  when numba is installed; the same bits; ``MTL_JAX_NUMPY_KERNELS=1`` keeps numpy).
* :mod:`.cores`: the in-memory jitted code run on groups of leaves (per-tensor TIES, DARE-TIES,
  Consensus TIES, LiNeS).
* :mod:`.ties_threshold`: the exact global TIES threshold and majority sign;
  :mod:`.ties_global`: the global TIES output pass.
* :mod:`.methods`: ``stream_<method>(stream, writer, hp)``, :data:`STREAMING_METHODS`,
  :func:`stream_merge`.

Inputs holding NaN / inf are refused as they are read (:mod:`mtl_jax.merging.input_checks`)
unless ``allow_nonfinite=True``; outputs are written to a hidden temporary sibling, fsynced and
renamed into place (:mod:`mtl_jax.merging.output_safety`).
"""

from mtl_jax.merging.streaming.formats import (
    input_labels,
    open_checkpoint,
    open_inputs,
    open_output,
    output_format_of,
)
from mtl_jax.merging.streaming.kernels import CHUNK
from mtl_jax.merging.streaming.methods import (
    PATCHED_OUTPUT,
    STREAMING_METHODS,
    StreamedMethod,
    stream_consensus,
    stream_dare,
    stream_lines,
    stream_merge,
    stream_task_arithmetic,
    stream_ties,
    stream_weight_average,
)
from mtl_jax.merging.streaming.orbax_io import OrbaxReader, OrbaxWriter
from mtl_jax.merging.streaming.passes import default_threads
from mtl_jax.merging.streaming.planning import LeafSpec, Stream, check_specs, dtype_class, leaf_working_set, plan_groups
from mtl_jax.merging.streaming.safetensors_io import (
    BufferedAppender,
    DirectAppender,
    SafetensorsReader,
    SafetensorsWriter,
    load_safetensors,
    read_safetensors_header,
    save_safetensors,
)

__all__ = [
    "BufferedAppender", "CHUNK", "DirectAppender", "LeafSpec", "OrbaxReader", "OrbaxWriter", "PATCHED_OUTPUT",
    "STREAMING_METHODS", "SafetensorsReader", "SafetensorsWriter", "Stream", "StreamedMethod", "check_specs",
    "default_threads", "dtype_class", "input_labels", "leaf_working_set", "load_safetensors", "open_checkpoint",
    "open_inputs", "open_output", "output_format_of", "plan_groups", "read_safetensors_header", "save_safetensors",
    "stream_consensus", "stream_dare", "stream_lines", "stream_merge", "stream_task_arithmetic", "stream_ties",
    "stream_weight_average",
]
