"""Import every module of this package so that each architecture's @register decorator runs.

Modules are found on disk, not listed: a new architecture is one new file in flashsae/models.
"""
import importlib
import pkgutil
from pathlib import Path

for _module in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__package__}.{_module.name}")
