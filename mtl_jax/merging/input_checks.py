"""Checks of a merge's inputs made before or while they are read: hyperparameters against the
method's signature, input paths that exist, and finite values.

Non-finite values: a NaN or inf in any input leaf is refused (:class:`NonFiniteInputError`,
naming the file and the tensor) unless ``allow_nonfinite=True``. For task arithmetic and
averaging it would make the output entry NaN/inf; DARE, Consensus and TIES can mask the entry
away (TIES ranks NaN above every magnitude and never keeps it), so the output alone does not
show it, and the streaming kernels check the inputs, not the output: each chunk's fp32 task
vectors ``tau_t = theta_t - theta_0`` (non-finite wherever an input is) are summed while in
cache, and only a non-finite sum (or a finite overflow of it) looks at the inputs themselves.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import numpy as np

from mtl_jax.errors import UsageError


class NonFiniteInputError(UsageError):
    """An input leaf holds NaN or inf; the message names the file and the tensor."""


def check_hparams(fn: Callable, given: Iterable[str], skip: int, what: str,
                  rename: Optional[dict[str, str]] = None) -> None:
    """UsageError naming a hyperparameter that ``fn`` (whose first ``skip`` parameters are the
    models) does not take, or a required one not given, and the valid ones. ``rename``: names as
    the caller spells them (e.g. DARE's ``key`` set as ``seed`` on the command line)."""
    rename = rename or {}
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [rename.get(p.name, p.name) for p in params]
    given = list(given)
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise UsageError(f"unknown hyperparameter {unknown[0]!r} for {what}; valid: {', '.join(valid) or 'none'}")
    missing = [rename.get(p.name, p.name) for p in params
               if p.default is p.empty and rename.get(p.name, p.name) not in given]
    if missing:
        raise UsageError(f"{what} needs hyperparameter {missing[0]!r}; valid: {', '.join(valid)}")


def with_defaults(fn: Callable, given: dict[str, Any], skip: int) -> dict[str, Any]:
    """Every hyperparameter of ``fn`` (its parameters after the first ``skip``): the ``given``
    value, else its default (names checked first by :func:`check_hparams`)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: given.get(p.name, p.default) for p in params}


def check_inputs_exist(inputs: Sequence[tuple[str, Any]]) -> None:
    """UsageError naming the first ``(label, path)`` that does not exist (reader objects pass)."""
    for label, path in inputs:
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
            raise UsageError(f"{label} '{path}' does not exist")


def _first_nonfinite(x: np.ndarray) -> Optional[int]:
    if x.dtype.kind in "biu":
        return None
    bad = ~np.isfinite(x.reshape(-1))
    return int(np.argmax(bad)) if bad.any() else None


def check_finite(label: str, name: str, x: np.ndarray, offset: int = 0) -> None:
    """NonFiniteInputError if ``x`` (entries ``offset...`` of leaf ``name`` of ``label``'s file)
    holds NaN or inf."""
    i = _first_nonfinite(np.asarray(x))
    if i is not None:
        value = np.asarray(x).reshape(-1)[i]
        raise NonFiniteInputError(
            f"{label}: tensor {name!r} holds a non-finite value ({float(value)}) at flat index {offset + i}; "
            "refusing to merge it (allow_nonfinite=True merges it anyway)"
        )


class FiniteCheck:
    """Names the input whose values are not finite: ``labels[i]`` of input i (0 = pretrained),
    ``names[index]`` of leaf ``index``."""

    def __init__(self, labels: Sequence[str], names: Sequence[str]):
        self.labels, self.names = list(labels), list(names)

    def chunk(self, index: int, p0: np.ndarray, fts: Sequence[np.ndarray], s: int, e: int) -> None:
        """Entries ``[s, e)`` of the flat inputs of leaf ``index`` (a no-op where all are finite)."""
        for label, x in zip(self.labels, [p0, *fts]):
            check_finite(label, self.names[index], x[s:e], s)

    def group(self, p0: dict[str, np.ndarray], fts: Sequence[dict[str, np.ndarray]]) -> None:
        """Whole leaves ``{name: array}`` of each input."""
        for label, tree in zip(self.labels, [p0, *fts]):
            for name, x in tree.items():
                check_finite(label, name, x)


__all__ = ["FiniteCheck", "NonFiniteInputError", "check_finite", "check_hparams", "check_inputs_exist", "with_defaults"]
