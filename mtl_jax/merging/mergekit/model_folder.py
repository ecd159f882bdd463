"""A Hugging Face model folder read lazily: ``config.json`` and the safetensors weights (one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``), tensor by tensor.

Only headers are read when a folder is opened (:func:`mtl_jax.merging.safetensors_header.parse_header`
checks them); :meth:`ModelFolder.view` maps one tensor zero-copy and :meth:`ModelFolder.release`
drops its pages from the process again, so a merge holds about one tensor per input.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from mtl_jax.errors import UsageError
from mtl_jax.merging.streaming.safetensors_io import SafetensorsReader

# Architectures whose weights follow the Hugging Face Llama layout (MergeKit's llama / mistral
# templates): embeddings, ``model.layers.{i}.*``, final norm, optional untied lm_head.
LLAMA_LAYOUT = ("LlamaForCausalLM", "MistralForCausalLM")
PRE_WEIGHTS = ("model.embed_tokens.weight",)
LAYER_WEIGHTS = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight", "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
)
NORM_WEIGHT, LM_HEAD, TIED_TO = "model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"
# Per-layer buffers that older checkpoints store and transformers recomputes from config.json: not weights.
DERIVED_LAYER_BUFFERS = ("self_attn.rotary_emb.inv_freq",)
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "added_tokens.json",
    "merges.txt", "chat_template.jinja", "generation_config.json", "chat_template.json", "video_preprocessor_config.json",
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_weight(index: int, suffix: str) -> str:
    return f"model.layers.{index}.{suffix}"


class ModelFolder:
    """One input model folder (holds file handles and headers, never tensors)."""

    def __init__(self, path: str):
        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise UsageError(f"model folder '{path}' has no config.json")
        try:
            with open(cfg_path) as f:
                self.config: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"'{cfg_path}' is not a readable JSON file: {e}") from None
        arch = self.config.get("architectures") or ["?"]
        self.architecture = arch[0]
        if self.architecture not in LLAMA_LAYOUT:
            raise UsageError(f"model folder '{path}': architecture {self.architecture!r} is not supported; "
                             f"supported (Hugging Face Llama layout): {', '.join(LLAMA_LAYOUT)}")
        layers = self.config.get("num_hidden_layers")
        if type(layers) is not int or layers < 0:
            raise UsageError(f"'{cfg_path}': num_hidden_layers must be a non-negative integer, got {layers!r}")
        self.num_layers = layers
        self.files = self._weight_files()
        self._readers: dict[str, SafetensorsReader] = {}
        self.where: dict[str, str] = {}
        self.specs: dict[str, Any] = {}
        for file in sorted(set(self.files.values()) if self.files else []):
            reader = self._reader(file)
            for name, spec in reader.specs.items():
                self.where[name] = file
                self.specs[name] = spec
        listed = {n for n, f in self.files.items()} if self._indexed else set()
        missing = sorted(n for n in listed if n not in self.where)
        if missing:
            raise UsageError(f"'{path}': model.safetensors.index.json lists {missing[:3]} but its shards do not hold them")

    def _weight_files(self) -> dict[str, str]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        single = os.path.join(self.path, "model.safetensors")
        self._indexed = os.path.isfile(index)
        if self._indexed:
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UsageError(f"'{index}' is not a valid safetensors index ({e})") from None
            for file in set(weight_map.values()):
                if os.path.basename(file) != file or not os.path.isfile(os.path.join(self.path, file)):
                    raise UsageError(f"'{index}' names the shard '{file}', which is not a file in '{self.path}'")
            return dict(weight_map)
        if os.path.isfile(single):
            return {"*": "model.safetensors"}
        raise UsageError(f"model folder '{self.path}' has no model.safetensors or model.safetensors.index.json "
                         "(only safetensors weights are read)")

    def _reader(self, file: str) -> SafetensorsReader:
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(os.path.join(self.path, file))
        return self._readers[file]

    @property
    def vocab_size(self) -> Any:
        return self.config.get("vocab_size")

    def has(self, name: str) -> bool:
        return name in self.specs

    def view(self, name: str) -> np.ndarray:
        """Zero-copy flat read-only view of tensor ``name``."""
        return self._reader(self.where[name]).view(name).reshape(-1)

    def prefetch(self, name: str) -> None:
        self._reader(self.where[name]).prefetch(name)

    def release(self, name: str) -> None:
        self._reader(self.where[name]).release(name)

    def outside_template(self) -> list[str]:
        """The tensors (sorted) that the Llama template does not name, which a merge would leave out:
        e.g. ``self_attn.q_proj.bias`` (``attention_bias: true``), layers from ``num_hidden_layers``
        on, any other top-level tensor. :data:`DERIVED_LAYER_BUFFERS` are not counted."""
        top = set(PRE_WEIGHTS) | {NORM_WEIGHT, LM_HEAD}
        per_layer = set(LAYER_WEIGHTS) | set(DERIVED_LAYER_BUFFERS)
        outside = []
        for name in self.specs:
            m = _LAYER.match(name)
            if m is None and name not in top:
                outside.append(name)
            elif m is not None and (name[m.end():] not in per_layer or int(m.group(1)) >= self.num_layers):
                outside.append(name)
        return sorted(outside)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


__all__ = ["DERIVED_LAYER_BUFFERS", "LAYER_WEIGHTS", "LLAMA_LAYOUT", "LM_HEAD", "ModelFolder", "NORM_WEIGHT", "PRE_WEIGHTS", "TIED_TO",
           "TOKENIZER_FILES", "layer_weight"]
