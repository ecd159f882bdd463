"""Which reader or writer a checkpoint path gets: a ``.safetensors`` file or an orbax checkpoint
directory in, safetensors or orbax out (from the extension unless named)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

from mtl_jax.errors import UsageError
from mtl_jax.merging.output_safety import merge_metadata
from mtl_jax.merging.streaming.orbax_io import OrbaxReader, OrbaxWriter
from mtl_jax.merging.streaming.planning import LeafSpec
from mtl_jax.merging.streaming.safetensors_io import SafetensorsReader, SafetensorsWriter


def open_checkpoint(path: Any, mmap: bool = False):
    """Reader for ``path``: a ``.safetensors`` file or an orbax checkpoint directory (a reader
    object is returned as is)."""
    if hasattr(path, "read_group"):
        return path
    path = str(path)
    if os.path.isdir(path):
        return OrbaxReader(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint '{path}' not found")
    return SafetensorsReader(path, mmap=mmap)


def output_format_of(path: str, output_format: Optional[str] = None) -> str:
    """'safetensors' or 'orbax': explicit, else from the extension (``.safetensors``)."""
    fmt = output_format or ("safetensors" if str(path).endswith(".safetensors") else "orbax")
    if fmt not in ("safetensors", "orbax"):
        raise UsageError(f"unknown output format {fmt!r}; valid: 'orbax', 'safetensors'")
    return fmt


def input_labels(num_finetuned: int) -> list[str]:
    """'pretrained', 'finetuned[0]', ...: how messages name the inputs."""
    return ["pretrained"] + [f"finetuned[{i}]" for i in range(num_finetuned)]


def open_inputs(paths: Sequence[Any], mmap: bool = False) -> list:
    """Readers of every input (all closed again if one fails to open)."""
    readers: list = []
    try:
        for p in paths:
            readers.append(open_checkpoint(p, mmap))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def open_output(output: str, fmt: str, specs: Sequence[LeafSpec], method: str, *,
                metadata: Optional[dict[str, str]] = None, direct: bool = True, overwrite: bool = False):
    """The writer of a merge output, marked as ours (:mod:`mtl_jax.merging.output_safety`)."""
    if fmt == "safetensors":
        return SafetensorsWriter(output, specs, merge_metadata(method, metadata), direct=direct, overwrite=overwrite)
    return OrbaxWriter(output, specs, overwrite=overwrite, method=method)
