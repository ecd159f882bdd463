"""Registries are plain dicts; ``lookup`` is the one way to read them, with an error that lists
the valid names."""

from __future__ import annotations

from typing import Collection, Mapping, TypeVar

from mtl_jax.errors import UsageError

T = TypeVar("T")


def lookup(registry: Mapping[str, T] | Collection[str], name: str, what: str) -> T | str:
    """``registry[name]`` (``name`` itself when ``registry`` is a collection of names, e.g. a tuple of
    valid choices); an unknown name raises ``UsageError("unknown {what} '{name}'; valid names: [...]")``
    (a ValueError)."""
    if name not in registry:
        raise UsageError(f"unknown {what} '{name}'; valid names: {sorted(registry)}")
    return registry[name] if isinstance(registry, Mapping) else name
