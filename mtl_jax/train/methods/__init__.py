"""MTL methods: loss weighting and gradient aggregation as pure ``init`` / ``update`` pairs.

``get_method(name, **hparams)`` builds a ``Method`` (see ``base.py`` for the contract) from the
registry ``METHODS`` (every factory's keyword defaults are the paper's, or the reference code's) or
the combinator ``chain`` (``COMBINATORS``): ``get_method('chain', weighting='uw',
aggregator={'name': 'pcgrad'})``, i.e. the config ``method.name='chain'``,
``method.weighting=...``, ``method.aggregator=...`` (each a method name or a mapping with ``name``
and its hyperparameters).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from mtl_jax.registry import lookup
from mtl_jax.train.methods import aggregation, jacobian, weighting
from mtl_jax.train.methods.base import (EmptyState, Method, MethodInputs, Needs, head_scales, normalized_gramian,
                                        returns_direction, with_num_params)
from mtl_jax.train.methods.chain import ChainState, chain, make_imtl, scale_inputs

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
    "gradnorm": weighting.make_gradnorm,  # wants the last shared layer's Gramian
    "excess_mtl": weighting.make_excess_mtl,  # needs='jacobian', returns weights; per-parameter state
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
    # direction-returning, from the Jacobian (per-parameter state: MoCo)
    "graddrop": jacobian.make_graddrop,
    "moco": jacobian.make_moco,
    # a loss weighting chained with a gradient method
    "imtl": make_imtl,  # chain(imtl_l, imtl_g), IMTL's hybrid (Liu et al. 2021, Sec. 3.3)
}


def _component(spec: Any, num_tasks: int | None, role: str) -> Method:
    """A ``Method`` from a chain component spec: a Method, a name, or a mapping with ``name`` and
    hyperparameters (a ``ConfigDict`` included)."""
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    try:
        hparams = dict(spec)
    except (TypeError, ValueError):
        hparams = {}
    if "name" not in hparams:
        raise ValueError(f"chain's {role} must be a method name, a mapping with 'name' and its hyperparameters, or a "
                         f"Method; got {spec!r}")
    name = hparams.pop("name")
    if num_tasks is not None:
        hparams.setdefault("num_tasks", num_tasks)
    return get_method(name, **hparams)


def make_chain(weighting: Any, aggregator: Any, num_tasks: int | None = None) -> Method:
    """``chain(weighting, aggregator)`` (``chain.py``) from config specs: each a method name
    (``'uw'``), a mapping ``{'name': 'uw', 'lr': 0.05}`` (``ConfigDict`` included) or a ``Method``.
    ``num_tasks``, when given, reaches both (their K >= 2 checks)."""
    return chain(_component(weighting, num_tasks, "weighting"), _component(aggregator, num_tasks, "aggregator"))


COMBINATORS: dict[str, Callable[..., Method]] = {"chain": make_chain}


def _factories() -> dict[str, Callable[..., Method]]:
    return {**METHODS, **COMBINATORS}


def hyperparameters(name: str) -> list[str]:
    """Keyword names ``METHODS[name]`` (or ``COMBINATORS[name]``) accepts (``num_tasks`` included)."""
    return list(inspect.signature(_factories()[name]).parameters)


def get_method(name: str, **hparams) -> Method:
    """``METHODS[name](**hparams)`` (or ``COMBINATORS[name]``), the user's hyperparameters checked
    against the factory's keywords.

    Raises:
      ValueError: for an unknown name (listing the valid names), an unknown hyperparameter
        (listing the method's valid ones), a missing required one (``weighting`` / ``aggregator``
        of ``chain``), or a Gramian method built with ``num_tasks < 2``.
    """
    factory = lookup(_factories(), name, "MTL method")
    signature = inspect.signature(factory)
    valid = list(signature.parameters)
    unknown = sorted(k for k in hparams if k not in valid)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for MTL method {name!r}; valid: {valid}")
    missing = [k for k, p in signature.parameters.items() if p.default is inspect.Parameter.empty and k not in hparams]
    if missing:
        raise ValueError(f"MTL method {name!r} needs hyperparameter(s) {missing}; valid: {valid}")
    return factory(**hparams)


__all__ = [
    "COMBINATORS",
    "ChainState",
    "EmptyState",
    "METHODS",
    "Method",
    "MethodInputs",
    "Needs",
    "chain",
    "get_method",
    "head_scales",
    "hyperparameters",
    "normalized_gramian",
    "returns_direction",
    "scale_inputs",
    "with_num_params",
]
