"""MergeKit (0.1.5) YAML configs run by mtl_jax: ``mtl-jax merge --mergekit-yaml FILE OUT_DIR``.

Modules, one concern each:

* :mod:`.config`: the YAML -> a checked :class:`MergeConfig` (unknown keys refused, naming the
  valid ones); parameter settings (scalars, layer gradients, ``filter`` lists).
* :mod:`.model_folder`: a Hugging Face model folder read lazily (single or sharded safetensors).
* :mod:`.plan`: the output tensors, their inputs (slices / ``layer_range``) and per-tensor
  parameters, checked before anything is written.
* :mod:`.methods`: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs(_ties),
  slerp, model_stock, passthrough: MergeKit's arithmetic over flat chunks.
* :mod:`.run`: the merge into a temporary sibling folder renamed into place, and the command.

Docs: ``docs/guides/merging_mergekit.md`` (supported keys, differences from MergeKit, benchmark).
"""

from mtl_jax.merging.mergekit.config import MergeConfig, evaluate_setting, parse_config
from mtl_jax.merging.mergekit.methods import METHODS, method_spec
from mtl_jax.merging.mergekit.plan import MergePlan, OutputTensor, build_plan
from mtl_jax.merging.mergekit.run import main, run_mergekit_yaml

__all__ = ["METHODS", "MergeConfig", "MergePlan", "OutputTensor", "build_plan", "evaluate_setting", "main", "method_spec",
           "parse_config", "run_mergekit_yaml"]
