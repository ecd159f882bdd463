"""Pretrained checkpoints without torch: read safetensors and PyTorch ``.pth`` / ``.bin`` files (zip
and legacy serialisation, through a restricted unpickler that builds only tensors), map their names
and layouts onto a Flax parameter tree and back, and write safetensors.

    state = read_checkpoint(path)                      # {name: np.ndarray}
    params = load_into(template, state, renames, what="MiniLM-L6")
    write_safetensors(out, export(params, renames))    # the original names and layouts
"""

from mtl_jax.checkpoints.formats import (
    CheckpointFormatError, checkpoint_format, read_checkpoint, read_safetensors, write_safetensors)
from mtl_jax.checkpoints.layout import (
    CONV2D, DEPTHWISE_CONV2D, IDENTITY, LINEAR, CheckpointMismatchError, Rename, Transform, export,
    flatten, load_into, source_shapes)

__all__ = ["CONV2D", "DEPTHWISE_CONV2D", "IDENTITY", "LINEAR", "CheckpointFormatError",
           "CheckpointMismatchError", "Rename", "Transform", "checkpoint_format", "export", "flatten",
           "load_into", "read_checkpoint", "read_safetensors", "source_shapes", "write_safetensors"]
