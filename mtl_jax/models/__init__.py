"""Multi-task models (flax linen). ``build_model(config.model, tasks)`` picks from plain-dict registries."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax.linen as nn

from mtl_jax.registry import lookup

from mtl_jax.models.architectures import ARCHITECTURES
from mtl_jax.models.deeponet import build_deeponet
from mtl_jax.models.heads import HEADS
from mtl_jax.models.multitab import build_multitab
from mtl_jax.models.multitask import HardParameterSharing
from mtl_jax.models.trunks import TRUNKS


def _build(registry: Mapping[str, type], name: str, kwargs: Mapping, what: str, **fixed) -> nn.Module:
    """``registry[name](**kwargs, **fixed)`` with errors naming unknown names and unknown options."""
    cls = lookup(registry, name, what)
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name") and f.name not in fixed]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {what} '{name}'; valid options: {valid}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs, **fixed)


def build_hps(cfg, tasks: Sequence) -> nn.Module:
    """Hard parameter sharing: ``cfg.trunk`` (TRUNKS) + one ``cfg.head`` (HEADS) per task."""
    trunk = _build(TRUNKS, cfg.trunk, dict(cfg.get("trunk_kwargs") or {}), "trunk")
    heads = {t.name: _build(HEADS, cfg.head, dict(cfg.get("head_kwargs") or {}), "head", num_outputs=t.num_outputs)
             for t in tasks}
    return HardParameterSharing(trunk=trunk, heads=heads)


MODELS = {"hps": build_hps, **ARCHITECTURES, "multitab": build_multitab, "deeponet": build_deeponet}


def build_model(cfg, tasks: Sequence) -> nn.Module:
    return lookup(MODELS, cfg.name, "model")(cfg, tasks)


__all__ = ["MODELS", "TRUNKS", "HEADS", "build_model", "HardParameterSharing"]
