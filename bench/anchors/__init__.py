"""One module per library under comparison, each exposing `available()` and
`run(spec, X_train, X_val, *, settings) -> BenchResult`.

Modules are imported lazily by name so that a missing or broken library only affects its row.
"""
from __future__ import annotations

import importlib
from types import ModuleType

LIBRARIES = {
    "flashsae": "bench.anchors.flashsae_",
    "saelens": "bench.anchors.saelens",
    "sparsify": "bench.anchors.sparsify",
    "dictionary_learning": "bench.anchors.dictionary_learning",
    "sklearn": "bench.anchors.sklearn_mbdl",
    "plain": "bench.anchors.plain",
}


def load(name: str) -> ModuleType:
    if name not in LIBRARIES:
        raise KeyError(f"unknown library {name!r}; choose from {', '.join(LIBRARIES)}")
    return importlib.import_module(LIBRARIES[name])
