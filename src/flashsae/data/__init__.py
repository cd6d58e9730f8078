"""Data: sources (arrays, files, shards, built-ins) and batching.

Imports only `errors`; activation capture from neural networks lives in `flashsae.lm` and is
imported on demand.
"""
from flashsae.data.batching import BatchIterator, iter_chunks, split_rows
from flashsae.data.builtin import SYNTHETIC_DEFAULTS, load_digits, make_synthetic
from flashsae.data.sources import (
    BUILTIN_NAMES,
    SUPPORTED_EXTENSIONS,
    ArraySource,
    ShardedSource,
    Source,
    open_source,
)

__all__ = [
    "BUILTIN_NAMES",
    "SUPPORTED_EXTENSIONS",
    "SYNTHETIC_DEFAULTS",
    "ArraySource",
    "BatchIterator",
    "ShardedSource",
    "Source",
    "iter_chunks",
    "load_digits",
    "make_synthetic",
    "open_source",
    "split_rows",
]
