"""MTL methods: loss weighting and gradient aggregation as pure ``init`` / ``update`` pairs.

``get_method(name, **hparams)`` builds a ``Method`` (see ``base.py`` for the contract) from the
registry ``METHODS``; every factory's keyword defaults are the paper's (or the reference code's).
"""

from __future__ import annotations

import inspect
from typing import Callable

from mtl_jax.registry import lookup
from mtl_jax.train.methods import aggregation, jacobian, weighting
from mtl_jax.train.methods.base import Method, MethodInputs, normalized_gramian, returns_direction

METHODS: dict[str, Callable[..., Method]] = {
    # loss weighting (needs='losses' unless noted)
    "ew": weighting.make_ew,
    "uw": weighting.make_uw,
    "dwa": weighting.make_dwa,
    "rlw": weighting.make_rlw,
    "gls": weighting.make_gls,
    "imtl_l": weighting.make_imtl_l,
    "famo": weighting.make_famo,
    "stch": weighting.make_stch,
    "gradnorm": weighting.make_gradnorm,  # needs='gramian' (last shared layer)
    "excess_mtl": weighting.make_excess_mtl,  # needs='jacobian', returns weights
    "db_mtl": aggregation.make_db_mtl,  # needs='gramian'
    # gradient aggregation from the Gramian
    "mgda": aggregation.make_mgda,
    "pcgrad": aggregation.make_pcgrad,
    "gradvac": aggregation.make_gradvac,
    "cagrad": aggregation.make_cagrad,
    "nash_mtl": aggregation.make_nash_mtl,
    "imtl_g": aggregation.make_imtl_g,
    "aligned_mtl": aggregation.make_aligned_mtl,
    "upgrad": aggregation.make_upgrad,
    "dualproj": aggregation.make_dualproj,
    "fairgrad": aggregation.make_fairgrad,
    "config": aggregation.make_config,
    "sdmgrad": aggregation.make_sdmgrad,
    "modo": aggregation.make_modo,
    # direction-returning, from the Jacobian
    "graddrop": jacobian.make_graddrop,
    "moco": jacobian.make_moco,
}


def hyperparameters(name: str) -> list[str]:
    """Keyword names ``METHODS[name]`` accepts (``num_tasks`` included)."""
    return list(inspect.signature(METHODS[name]).parameters)


def get_method(name: str, **hparams) -> Method:
    """``METHODS[name](**hparams)``.

    Raises:
      ValueError: for an unknown name (listing the valid names), an unknown hyperparameter
        (listing the method's valid ones), a missing required one (``num_params`` of MoCo /
        ExcessMTL), or a Gramian method built with ``num_tasks < 2``.
    """
    signature = inspect.signature(lookup(METHODS, name, "MTL method"))
    valid = list(signature.parameters)
    unknown = sorted(k for k in hparams if k not in valid)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for MTL method {name!r}; valid: {valid}")
    missing = [k for k, p in signature.parameters.items() if p.default is inspect.Parameter.empty and k not in hparams]
    if missing:
        raise ValueError(f"MTL method {name!r} needs hyperparameter(s) {missing}; valid: {valid}")
    return METHODS[name](**hparams)


make_method = get_method

__all__ = [
    "METHODS",
    "Method",
    "MethodInputs",
    "get_method",
    "hyperparameters",
    "make_method",
    "normalized_gramian",
    "returns_direction",
]
