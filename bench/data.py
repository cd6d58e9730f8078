"""Benchmark data: a planted sparse dictionary (ground truth known) and scikit-learn's digits.

Generated once per comparison run, in the parent process, then handed to every library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def planted(
    n_rows: int, d: int, n_atoms: int, active: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that are sparse combinations of a hidden dictionary, plus gaussian noise.

    Each row x = sum over `active` distinct atoms (chosen uniformly) of c_j * atom_j + noise, with
    atoms unit-norm gaussian directions, c_j ~ Uniform(0.5, 2.0) and noise ~ N(0, noise^2) per
    coordinate.

    Returns:
        X: (n_rows, d) float32.
        atoms: (n_atoms, d) float32, unit-norm rows.
    """
    if not 1 <= active <= n_atoms:
        raise ValueError(f"active must be in [1, n_atoms], got {active} of {n_atoms}")
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    X = torch.empty(n_rows, d)
    chunk = 16384  # bounded memory per block
    for start in range(0, n_rows, chunk):
        n = min(chunk, n_rows - start)
        # `active` distinct atoms per row: the top `active` of uniform scores.
        idx = _distinct_indices(n, n_atoms, active, gen)
        coef = torch.empty(n, active).uniform_(0.5, 2.0, generator=gen)
        x = F.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")  # sum_j c_j * atom_j
        x += noise * torch.randn(n, d, generator=gen)
        X[start : start + n] = x
    return X, atoms


def _distinct_indices(n: int, n_atoms: int, active: int, gen: torch.Generator) -> torch.Tensor:
    """(n, active) distinct atom indices per row, uniform over subsets."""
    if active * active > n_atoms:  # redraws would be frequent: rank random scores instead
        return torch.rand(n, n_atoms, generator=gen).topk(active, dim=1).indices
    idx = torch.randint(n_atoms, (n, active), generator=gen)
    while True:
        s, _ = idx.sort(dim=1)
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
        if not dup.any():
            return idx
        rows = dup.nonzero().squeeze(1)
        idx[rows] = torch.randint(n_atoms, (rows.numel(), active), generator=gen)


def digits() -> torch.Tensor:
    """scikit-learn's 8x8 handwritten digits: (1797, 64) float32 pixel intensities in [0, 16]."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().data).float()
