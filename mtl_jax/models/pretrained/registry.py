"""Pretrained trunk weights by name: ``config.model.pretrained`` picks one of ``PRETRAINED``.

Each entry names the trunk (a key of ``mtl_jax.models.TRUNKS``, built with its default options) whose
architecture the weights are for, and loads its variables (``{'params': ..., 'batch_stats'?: ...}``)
from a package installed on this machine (no network). The trainer puts them into every copy of that
trunk (``weights.fill_trunks``); ``mtl_jax.data.frozen_features`` runs the trunk frozen.
"""

from __future__ import annotations

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


def load_pretrained(name: str) -> Mapping:
    """The trunk variables ``name`` (a key of ``PRETRAINED``) loads."""
    return lookup(PRETRAINED, name, "pretrained trunk").load()


def pretrained_trunk(name: str):
    """``(module, variables)``: the trunk module ``name``'s weights are for, and the weights."""
    from mtl_jax.models import TRUNKS

    entry = lookup(PRETRAINED, name, "pretrained trunk")
    return lookup(TRUNKS, entry.trunk, "trunk")(), entry.load()
