"""Several aligned Sources read side by side as one: the layer axis of crosscoders and cross-layer
transcoders.

Row i of a `LayerSource` is row i of every part, concatenated: a model reads L layers of width d
as one row of L * d columns, and `blocks` says where each layer's columns lie.
"""
from __future__ import annotations

import numpy as np

from flashsae.data.sources import Source
from flashsae.errors import DataError


class LayerSource(Source):
    """The columns of `parts` side by side; every part must have the same rows."""

    def __init__(self, parts: list[Source]):
        if len(parts) < 2:
            raise DataError("a layer axis needs at least two sources")
        rows = {p.n_rows for p in parts}
        if len(rows) > 1:
            raise DataError("layers " + ", ".join(f"{p.name} ({p.n_rows} rows)" for p in parts)
                            + " must have the same number of rows")
        self.parts = list(parts)
        self.name = " + ".join(p.name for p in parts)
        self.n_rows = parts[0].n_rows
        self.d_in = sum(p.d_in for p in parts)
        self.widths = [p.d_in for p in parts]
        self.provenance = {"layers": [p.provenance for p in parts]} \
            if any(p.provenance for p in parts) else None

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """[start, stop) of each part's columns."""
        edges = np.cumsum([0, *self.widths])
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([p.read(start, stop) for p in self.parts], axis=1)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.concatenate([p.take(rows) for p in self.parts], axis=1)
