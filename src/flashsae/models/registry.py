"""Architecture registry: the one list of architectures, looked up by lowercase-hyphenated key.

Everything that depends on the set of architectures (CLI flags, the estimator's parameters, export
mappings, the docs tables, parametrised tests) asks this module at call time, so an architecture
registered later (a plugin, a test's toy model) is picked up everywhere.
Imports nothing from trainer, io or cli.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import TYPE_CHECKING

from flashsae.errors import ConfigError

if TYPE_CHECKING:
    from flashsae.models.base import SparseAutoencoder

DEFAULT = "topk"
"""The architecture used when none is given (CLI, `train()`, the estimator)."""

_REGISTRY: dict[str, type["SparseAutoencoder"]] = {}
_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def register(name: str):
    """Class decorator: make an SAE class available under `name` (CLI, config and saved files).

    Raises:
        RuntimeError: `name` is taken, is not lowercase-hyphenated, or the class has no config
            dataclass derived from `ModelConfig`.
    """

    def wrap(cls):
        from flashsae.models.base import ModelConfig

        if name in _REGISTRY:
            raise RuntimeError(f"architecture {name!r} registered twice")
        if not _NAME.fullmatch(name):
            raise RuntimeError(f"architecture name {name!r} must be lowercase-hyphenated (like 'relu-l1')")
        config_cls = getattr(cls, "config_cls", None)
        if not (isinstance(config_cls, type) and issubclass(config_cls, ModelConfig)
                and dataclasses.is_dataclass(config_cls)):
            raise RuntimeError(f"architecture {name!r}: config_cls must be a dataclass derived from ModelConfig")
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def unregister(name: str) -> type["SparseAutoencoder"]:
    """Remove `name` from the registry and return its class (for tests and plugins that clean up)."""
    cls = get(name)
    del _REGISTRY[name]
    return cls


@contextlib.contextmanager
def registered(name: str, cls: type["SparseAutoencoder"]):
    """Register `cls` as `name` for the duration of a `with` block, then remove it again."""
    register(name)(cls)
    try:
        yield cls
    finally:
        _REGISTRY.pop(name, None)


def get(name: str) -> type["SparseAutoencoder"]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


def options() -> dict[str, dict[str, object]]:
    """Every model option of every architecture: option name -> {architecture: its default}.

    Options are the fields of the config classes except `d_in` and `d_out`, which come from the data; in
    order of first appearance (the shared `ModelConfig` fields first). A field without a default
    maps to `dataclasses.MISSING`.
    """
    out: dict[str, dict[str, object]] = {}
    for name in names():
        for f in dataclasses.fields(_REGISTRY[name].config_cls):
            if f.name in ("d_in", "d_out"):
                continue
            default = f.default
            if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out.setdefault(f.name, {})[name] = default
    return out
