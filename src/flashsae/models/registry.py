"""Architecture registry: one decorator per architecture, looked up by its lowercase-hyphenated key.

Imports nothing from trainer, io or cli.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from flashsae.errors import ConfigError

if TYPE_CHECKING:
    from flashsae.models.base import SparseAutoencoder

_REGISTRY: dict[str, type["SparseAutoencoder"]] = {}


def register(name: str):
    """Class decorator: make an SAE class available under `name` (CLI, config and saved files)."""

    def wrap(cls):
        if name in _REGISTRY:
            raise RuntimeError(f"architecture {name!r} registered twice")
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get(name: str) -> type["SparseAutoencoder"]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)
