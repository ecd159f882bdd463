"""Builders of the multi-task architectures (LibMTL's set): ``build_<arch>(cfg, tasks) -> nn.Module``.

Each reads ``cfg.trunk`` / ``cfg.trunk_kwargs`` (the expert or column encoder), ``cfg.head`` /
``cfg.head_kwargs`` (one head per task) and ``cfg.arch_kwargs`` (the architecture's own options,
the fields of its module); unknown names or options fail listing the valid ones.

================  ============================  ==========================================
model name        trunk registry                arch_kwargs (defaults)
================  ============================  ==========================================
``mmoe``          TRUNKS (mlp, lenet, vit)      num_experts=4
``cgc``           TRUNKS                        num_shared_experts=1, num_specific_experts=1
``dselect_k``     TRUNKS                        num_experts=4, num_nonzeros=2, kgamma=1.0
``ple``           STAGED_TRUNKS (mlp, lenet)    num_shared_experts=1, num_specific_experts=1
``mtan``          STAGED_TRUNKS                 (none)
``cross_stitch``  STAGED_TRUNKS                 alpha_self=1.0, alpha_other=1.0
``ltb``           STAGED_TRUNKS                 epochs=100, steps_per_epoch=100
``unifork``       TRUNKS: vit                   shared_depth=2
``taskexpert``    TRUNKS: vit                   num_experts=4, expert_dim=64, gating='token'
``slimmable``     (its own slimmable layers)    encoder_features=(20, 40), decoder_hidden=(128,), kernel_size=5,
                                                padding='VALID', widths=(0.25, 0.5, 0.75, 1.0)
``m3vit``         (its own MoE ViT)             patch_size=4, dim=64, depth=4, num_heads=4, mlp_dim=128,
                                                num_experts=8, top_k=2, capacity_factor=1.25, moe_every=2,
                                                load_balance_weight=0.01, mi_weight=0.0, expert_mlp_dim=0
                                                (0: mlp_dim), group_size=0 (0: an example's tokens)
``mod_squad``     (its own MoE ViT)             as m3vit, with moe_every=1, mi_weight=1.0
================  ============================  ==========================================
"""

from __future__ import annotations

import functools

from typing import Sequence

import flax.linen as nn

from mtl_jax.models.cross_stitch import CrossStitch
from mtl_jax.models.heads import HEADS
from mtl_jax.models.ltb import LTB
from mtl_jax.models.moe import CGC, PLE, DSelectK, MMoE
from mtl_jax.models.moe_vit import M3ViT, ModSquad
from mtl_jax.models.mtan import MTAN
from mtl_jax.models.slimmable import SlimmableMTL
from mtl_jax.models.staged import STAGED_TRUNKS
from mtl_jax.models.taskexpert import TaskExpert
from mtl_jax.models.trunk_registry import TRUNKS
from mtl_jax.models.unifork import UniFork


def _build(*args, **kwargs) -> nn.Module:
    """``mtl_jax.models._build`` (imported late: that package imports this module)."""
    from mtl_jax.models import _build as build

    return build(*args, **kwargs)


def _options(cfg, key: str) -> dict:
    return dict(cfg.get(key) or {})


def _heads(cfg, tasks: Sequence) -> dict:
    """{task name: head module} from ``cfg.head`` / ``cfg.head_kwargs``."""
    return {t.name: _build(HEADS, cfg.head, _options(cfg, "head_kwargs"), "head", num_outputs=t.num_outputs)
            for t in tasks}


def _architecture(cls: type, name: str, cfg, tasks: Sequence, staged: bool) -> nn.Module:
    """``cls(<encoder>, heads, **cfg.arch_kwargs)``; the encoder field is ``expert`` or ``encoder``
    (not ``trunk``: code that finds ``trunk`` and ``heads`` takes a model for hard parameter sharing)."""
    registry, what = (STAGED_TRUNKS, "staged trunk") if staged else (TRUNKS, "trunk")
    encoder = _build(registry, cfg.trunk, _options(cfg, "trunk_kwargs"), what)
    field = "expert" if "expert" in cls.__dataclass_fields__ else "encoder"
    return _build({name: cls}, name, _options(cfg, "arch_kwargs"), "model",
                  **{field: encoder, "heads": _heads(cfg, tasks)})


# name -> (module, built on a staged trunk?): MMoE (Ma et al. 2018), CGC / PLE (Tang et al. 2020),
# DSelect-k (Hazimeh et al. 2021), MTAN (Liu et al. 2019), Cross-stitch (Misra et al. 2016),
# Learning-to-Branch (Guo et al. 2020); each module's docstring has the details.
_SPECS = {"mmoe": (MMoE, False), "cgc": (CGC, False), "dselect_k": (DSelectK, False), "ple": (PLE, True),
          "mtan": (MTAN, True), "cross_stitch": (CrossStitch, True), "ltb": (LTB, True),
          "unifork": (UniFork, False), "taskexpert": (TaskExpert, False)}  # UniFork (2025), TaskExpert (ICCV 2023): ViT
ARCHITECTURES = {name: functools.partial(_architecture, cls, name, staged=staged)
                 for name, (cls, staged) in _SPECS.items()}


def _slimmable(cfg, tasks: Sequence) -> nn.Module:
    """Slimmable encoder + decoders (Aich et al. 2023); its own layers: ``cfg.trunk`` / ``cfg.head`` are not read."""
    return _build({"slimmable": SlimmableMTL}, "slimmable", _options(cfg, "arch_kwargs"), "model",
                  tasks=tuple((t.name, t.num_outputs) for t in tasks))


ARCHITECTURES["slimmable"] = _slimmable


def _task_moe_vit(cls: type, name: str, cfg, tasks: Sequence) -> nn.Module:
    """M3ViT / Mod-Squad (moe_vit.py): the ViT options are ``cfg.arch_kwargs``; ``cfg.head`` per task."""
    if _options(cfg, "trunk_kwargs"):
        raise ValueError(f"model '{name}' takes its ViT options in arch_kwargs; trunk_kwargs "
                         f"{_options(cfg, 'trunk_kwargs')} would be ignored")
    return _build({name: cls}, name, _options(cfg, "arch_kwargs"), "model", heads=_heads(cfg, tasks))


ARCHITECTURES.update({name: functools.partial(_task_moe_vit, cls, name)
                      for name, cls in (("m3vit", M3ViT), ("mod_squad", ModSquad))})
