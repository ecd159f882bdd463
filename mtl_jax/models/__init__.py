"""Multi-task models (flax linen). ``build_model(config.model, tasks)`` picks from plain-dict registries."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Mapping, Sequence

import flax.linen as nn
from ml_collections import ConfigDict

from mtl_jax.errors import UsageError
from mtl_jax.registry import lookup

from mtl_jax.models.architectures import ARCHITECTURES
from mtl_jax.models.deeponet import build_deeponet
from mtl_jax.models.dense_resnet import DENSE_RESNET_MODELS
from mtl_jax.models.graph import build_graph_model
from mtl_jax.models.heads import HEADS
from mtl_jax.models.multitab import build_multitab
from mtl_jax.models.multitask import HardParameterSharing
from mtl_jax.models.pretrained.backbones import IMAGE_BACKBONES
from mtl_jax.models.segnet import SEGNET_MODELS
from mtl_jax.models.trunk_registry import TRUNKS
from mtl_jax.models.trunks import remat_compiler_options


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


MODELS = {"hps": build_hps, **ARCHITECTURES, "multitab": build_multitab, "deeponet": build_deeponet,
          "mpnn": build_graph_model, "gin": build_graph_model, **SEGNET_MODELS,
          **DENSE_RESNET_MODELS}


# Models whose shared encoder is a ``TRUNKS`` module run as is (its ``remat`` field is honoured).
REMAT_MODELS = ("hps", "mmoe", "cgc", "dselect_k")


def build_model(cfg, tasks: Sequence, remat: bool = False) -> nn.Module:
    """The model ``cfg`` (``config.model``) names, for ``tasks``. ``remat`` (``config.remat``):
    rematerialise the trunk's repeated blocks (``trunks.py``; same parameters, outputs and
    gradients); models in ``REMAT_MODELS`` only, others raise UsageError. ``trunk_kwargs.remat``
    does the same per config."""
    if remat:
        cfg = with_remat(cfg)
    return lookup(MODELS, cfg.name, "model")(cfg, tasks)


def with_remat(cfg):
    """A copy of ``cfg`` (``config.model``) with ``trunk_kwargs.remat = True``; UsageError naming the
    model when it does not run its trunk as a ``TRUNKS`` module (own encoders, staged trunks, UniFork /
    TaskExpert, which build the ViT blocks themselves)."""
    if cfg.name not in REMAT_MODELS:
        raise UsageError(f"config.remat: model '{cfg.name}' does not support rematerialisation; models that do: "
                         f"{list(REMAT_MODELS)} (trunks {sorted(TRUNKS)})")
    lookup(TRUNKS, cfg.trunk, "trunk")
    cfg = copy.deepcopy(cfg)
    kwargs = dict(cfg.get("trunk_kwargs") or {})
    kwargs["remat"] = True
    with cfg.unlocked() if isinstance(cfg, ConfigDict) else contextlib.nullcontext():
        cfg["trunk_kwargs"] = ConfigDict(kwargs)
    return cfg


# Encoders that convolve or cut patches: their per-example input must be an image [H, W, C].
IMAGE_TRUNKS = ("lenet", "vit") + IMAGE_BACKBONES
IMAGE_MODELS = ("slimmable", "m3vit", "mod_squad") + tuple(SEGNET_MODELS) + tuple(DENSE_RESNET_MODELS)
OWN_ENCODER = IMAGE_MODELS + ("multitab", "deeponet", "mpnn", "gin")  # models that do not read cfg.trunk


def check_input(cfg, example_shape: Sequence[int], input_key: str = "image") -> None:
    """Raises naming the model, its trunk and the input when an image encoder gets no [H, W, C] input
    (e.g. LeNet / ViT / M3ViT on a tabular dataset), instead of a shape error inside a convolution."""
    trunk = None if cfg.name in OWN_ENCODER else cfg.get("trunk")
    if (cfg.name in IMAGE_MODELS or trunk in IMAGE_TRUNKS) and len(example_shape) != 3:
        what = f"model '{cfg.name}'" + (f" with trunk '{trunk}'" if trunk else "")
        raise ValueError(f"{what} needs images [H, W, C] per example; input '{input_key}' has shape "
                         f"{tuple(example_shape)} per example (for vector inputs use model 'hps' with trunk 'mlp', "
                         f"an architecture on trunk 'mlp', or 'multitab')")


__all__ = ["MODELS", "TRUNKS", "HEADS", "REMAT_MODELS", "build_model", "remat_compiler_options", "check_input",
           "HardParameterSharing"]
