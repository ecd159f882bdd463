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
================  ============================  ==========================================
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from mtl_jax.models.cross_stitch import CrossStitch
from mtl_jax.models.heads import HEADS
from mtl_jax.models.ltb import LTB
from mtl_jax.models.moe import CGC, PLE, DSelectK, MMoE
from mtl_jax.models.mtan import MTAN
from mtl_jax.models.staged import STAGED_TRUNKS
from mtl_jax.models.trunks import TRUNKS


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


def build_mmoe(cfg, tasks: Sequence) -> nn.Module:
    """MMoE (Ma et al. 2018): shared trunk experts, one softmax gate per task."""
    return _architecture(MMoE, "mmoe", cfg, tasks, staged=False)


def build_cgc(cfg, tasks: Sequence) -> nn.Module:
    """CGC (Tang et al. 2020): shared and task-specific trunk experts, one gate per task."""
    return _architecture(CGC, "cgc", cfg, tasks, staged=False)


def build_dselect_k(cfg, tasks: Sequence) -> nn.Module:
    """DSelect-k (Hazimeh et al. 2021): shared trunk experts, a sparse DSelect-k gate per task."""
    return _architecture(DSelectK, "dselect_k", cfg, tasks, staged=False)


def build_ple(cfg, tasks: Sequence) -> nn.Module:
    """PLE (Tang et al. 2020): CGC at every stage of staged-trunk experts."""
    return _architecture(PLE, "ple", cfg, tasks, staged=True)


def build_mtan(cfg, tasks: Sequence) -> nn.Module:
    """MTAN (Liu et al. 2019): task attention masks over a shared staged trunk's stages."""
    return _architecture(MTAN, "mtan", cfg, tasks, staged=True)


def build_cross_stitch(cfg, tasks: Sequence) -> nn.Module:
    """Cross-stitch (Misra et al. 2016): task columns mixed by cross-stitch units between stages."""
    return _architecture(CrossStitch, "cross_stitch", cfg, tasks, staged=True)


def build_ltb(cfg, tasks: Sequence) -> nn.Module:
    """Learning-to-Branch (Guo et al. 2020): task columns with Gumbel-softmax branching between stages."""
    return _architecture(LTB, "ltb", cfg, tasks, staged=True)


ARCHITECTURES = {"mmoe": build_mmoe, "cgc": build_cgc, "dselect_k": build_dselect_k, "ple": build_ple,
                 "mtan": build_mtan, "cross_stitch": build_cross_stitch, "ltb": build_ltb}
