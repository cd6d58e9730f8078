"""Batched orthogonal matching pursuit (OMP) in PyTorch: sparse codes of rows over a fixed dictionary.

All rows of a batch advance together: each of the `n_nonzero` iterations picks, per row, the atom
most correlated with the residual, then refits the coefficients of every selected atom by least
squares. The least-squares systems are solved through a Cholesky factor of the selected atoms'
Gram matrix, grown by one row per iteration (the Cholesky form of OMP: Rubinstein, Zibulevsky &
Elad, 2008), so the only Python loop is over iterations, never over rows.

A row whose residual vanishes, or whose next atom is linearly dependent on those already chosen,
stops there: its remaining slots keep value 0 (scikit-learn's OMP stops at the same points).
Imports only torch and `errors`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flashsae.errors import ConfigError, DataError

_UNIT_NORM_TOL = 1e-3


@torch.no_grad()
def omp(X: Tensor, D: Tensor, n_nonzero: int, batch: int = 4096) -> tuple[Tensor, Tensor]:
    """Sparse codes of `X` over the dictionary `D` with at most `n_nonzero` atoms per row.

    Args:
        X: (n, d) rows to encode.
        D: (atoms, d) dictionary with unit-norm rows, same dtype and device as X.
        n_nonzero: atoms selected per row, 1 <= n_nonzero <= atoms.
        batch: rows solved together (bounds the (batch, atoms) correlation matrix).

    Returns:
        values (n, n_nonzero) and indices (n, n_nonzero) int64, in selection order, so that
        X[i] ~= sum_j values[i, j] * D[indices[i, j]]. Indices within a row are distinct; slots
        after a row stopped early hold value 0.

    Raises:
        ConfigError: n_nonzero or batch out of range.
        DataError: shapes do not match, or D's rows are not unit norm.
    """
    if X.ndim != 2 or D.ndim != 2 or X.shape[1] != D.shape[1]:
        raise DataError(f"X (n, d) and D (atoms, d) must share d, got {tuple(X.shape)} and {tuple(D.shape)}")
    n_atoms = D.shape[0]
    if not 1 <= n_nonzero <= n_atoms:
        raise ConfigError(f"n_nonzero must be in [1, {n_atoms}] (the number of atoms), got {n_nonzero}")
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    norms = D.norm(dim=1)
    if n_atoms and bool(((norms - 1).abs() > _UNIT_NORM_TOL).any()):
        raise DataError("dictionary rows must have unit norm; divide each atom by its norm first")
    X = X.to(D.dtype)
    values = X.new_zeros((X.shape[0], n_nonzero))
    indices = torch.zeros((X.shape[0], n_nonzero), dtype=torch.int64, device=X.device)
    for start in range(0, X.shape[0], batch):
        stop = min(start + batch, X.shape[0])
        values[start:stop], indices[start:stop] = _omp_batch(X[start:stop], D, n_nonzero)
    return values, indices


def _omp_batch(x: Tensor, D: Tensor, n_nonzero: int) -> tuple[Tensor, Tensor]:
    """OMP of one batch x (b, d); returns values and indices, each (b, n_nonzero)."""
    b = x.shape[0]
    # Rounding in the Gram products is about eps (1e-7 in float32): thresholds sit well above it.
    tol = 100 * torch.finfo(x.dtype).eps
    tiny = torch.finfo(x.dtype).tiny
    x_norm = x.norm(dim=1)
    rows = torch.arange(b, device=x.device)
    alpha = x @ D.T  # (b, atoms): correlations of the rows with every atom
    idx = torch.zeros((b, n_nonzero), dtype=torch.int64, device=x.device)
    A = x.new_zeros((b, n_nonzero, x.shape[1]))  # the selected atoms, row by row
    L = x.new_zeros((b, n_nonzero, n_nonzero))  # Cholesky factor of the selected atoms' Gram matrix
    rhs = x.new_zeros((b, n_nonzero, 1))  # alpha at the selected atoms; 0 in slots after a row stopped
    coef = x.new_zeros((b, n_nonzero))
    chosen = torch.zeros_like(alpha, dtype=torch.bool)
    live = torch.ones(b, dtype=torch.bool, device=x.device)
    corr = alpha
    for t in range(n_nonzero):
        best, j = corr.abs().masked_fill_(chosen, -1.0).max(dim=1)
        live &= best > tol * x_norm  # nothing left to explain
        idx[:, t] = j
        chosen[rows, j] = True
        atom = D[j]  # (b, d)
        A[:, t] = atom
        w = torch.linalg.solve_triangular(L[:, :t, :t], torch.bmm(A[:, :t], atom.unsqueeze(-1)),
                                          upper=False).squeeze(-1)  # (b, t)
        innovation = atom.square().sum(1) - w.square().sum(1)
        # A new atom (numerically) in the span of the chosen ones ends that row, as in scikit-learn.
        live &= innovation > tol
        L[:, t, :t] = torch.where(live[:, None], w, 0.0)
        L[:, t, t] = torch.where(live, innovation.clamp_min(tiny).sqrt(), 1.0)
        rhs[:, t, 0] = torch.where(live, alpha[rows, j], 0.0)
        coef[:, : t + 1] = torch.cholesky_solve(rhs[:, : t + 1], L[:, : t + 1, : t + 1], upper=False).squeeze(-1)
        if t + 1 < n_nonzero:
            residual = x - torch.bmm(coef[:, None, : t + 1], A[:, : t + 1]).squeeze(1)
            corr = residual @ D.T
    return coef, idx
