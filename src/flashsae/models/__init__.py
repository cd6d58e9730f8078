"""SAE architectures, registered by name. Importing this package registers every architecture.

Architecture modules are found on disk, not listed: a new architecture is one new file here.
"""
import importlib
import pkgutil
from pathlib import Path

from flashsae.models.base import ForwardOutput, ModelConfig, SparseAutoencoder, SparseCodes
from flashsae.models.registry import DEFAULT, get, names, options, register, registered, unregister

for _module in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")  # runs each architecture's @register

__all__ = ["ForwardOutput", "ModelConfig", "SparseAutoencoder", "SparseCodes", "DEFAULT", "get", "names", "options",
           "register", "registered", "unregister", "build"]


def build(architecture: str, standardizer=None, **options) -> SparseAutoencoder:
    """Construct a registered architecture from keyword options (fields of its config class)."""
    cls = get(architecture)
    return cls(cls.config_cls(**options), standardizer)
