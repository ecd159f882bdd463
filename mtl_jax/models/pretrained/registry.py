"""Pretrained trunk weights: by name (``config.model.pretrained``, one of ``PRETRAINED``) or from a
checkpoint file the user has (``config.model.pretrained_file``, for the trunks of ``FILE_LOADERS``).

Each ``PRETRAINED`` entry names the trunk (a key of ``mtl_jax.models.TRUNKS``, built with its default
options) whose architecture the weights are for, and loads its variables (``{'params': ...,
'batch_stats'?: ...}``) from a package installed on this machine (no network). ``FILE_LOADERS`` read a
trunk's variables from a local checkpoint in its reference layout (e.g. torchvision's
``resnet18-f37072fd.pth`` for ``resnet18``: safetensors or torch files, never unpickled beyond tensors).
The trainer puts them into every copy of that trunk (``weights.fill_trunks``);
``mtl_jax.data.frozen_features`` runs a named trunk frozen.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, NamedTuple

from mtl_jax.registry import lookup


class Pretrained(NamedTuple):
    trunk: str  # key of mtl_jax.models.TRUNKS: the architecture, with its default options
    load: Callable[[], Mapping]  # () -> the trunk's variables


def _minilm_l6() -> Mapping:
    from mtl_jax.models.pretrained.bert import load_minilm

    _, params, _ = load_minilm()
    return {"params": params}


def _efficientnet_lite0() -> Mapping:
    from mtl_jax.models.pretrained.efficientnet_lite import load_efficientnet_lite0

    _, variables = load_efficientnet_lite0(num_classes=0)
    return variables


PRETRAINED = {"minilm_l6": Pretrained("bert", _minilm_l6),
              "efficientnet_lite0": Pretrained("efficientnet_lite0", _efficientnet_lite0)}


def _torchvision_resnet(depth: int) -> Callable[[str], Mapping]:
    def load(path: str) -> Mapping:
        from mtl_jax.models.pretrained.resnet import load_resnet

        return load_resnet(path, depth, num_classes=0)[1]

    return load


FILE_LOADERS = {f"resnet{depth}": _torchvision_resnet(depth) for depth in (18, 34, 50, 101, 152)}
FILE_MODELS = {"resnet_aspp": lambda model_cfg: f"resnet{model_cfg.arch_kwargs.get('depth', 50)}"}


def file_trunk(model_cfg) -> str:
    """The ``FILE_LOADERS`` key whose weights ``model_cfg``'s shared trunk takes: ``model.trunk``, or
    for a model with a fixed encoder (``FILE_MODELS``: ``resnet_aspp``'s dilated ResNet keeps
    torchvision's names) that encoder's."""
    return FILE_MODELS[model_cfg.name](model_cfg) if model_cfg.name in FILE_MODELS else model_cfg.trunk


def check_trunk_file(trunk: str, path: str) -> None:
    """One-line errors, before anything is built: ``trunk`` has no file loader (naming those that
    do), or ``path`` is not a file."""
    lookup(FILE_LOADERS, trunk, "model.trunk with a model.pretrained_file loader")
    if not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(f"model.pretrained_file '{path}' is not a file")


def load_trunk_file(trunk: str, path: str) -> Mapping:
    """The variables of ``trunk`` (a key of ``FILE_LOADERS``) read from the checkpoint at ``path``;
    a mismatched checkpoint raises ``CheckpointMismatchError`` naming the tensors."""
    check_trunk_file(trunk, path)
    return FILE_LOADERS[trunk](os.path.expanduser(path))


def load_pretrained(name: str) -> Mapping:
    """The trunk variables ``name`` (a key of ``PRETRAINED``) loads."""
    return lookup(PRETRAINED, name, "pretrained trunk").load()


def pretrained_trunk(name: str):
    """``(module, variables)``: the trunk module ``name``'s weights are for, and the weights."""
    from mtl_jax.models import TRUNKS

    entry = lookup(PRETRAINED, name, "pretrained trunk")
    return lookup(TRUNKS, entry.trunk, "trunk")(), entry.load()
