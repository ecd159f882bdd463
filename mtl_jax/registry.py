"""Registries are plain dicts; ``lookup`` is the one way to read them, with an error that lists
the valid names."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``; an unknown name raises ``ValueError("unknown {what} '{name}'; valid names: [...]")``."""
    if name not in registry:
        raise ValueError(f"unknown {what} '{name}'; valid names: {sorted(registry)}")
    return registry[name]
