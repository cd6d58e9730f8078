"""Metric functions on tensors. Pure: no I/O, no model state."""
from __future__ import annotations

import torch
from torch import Tensor


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x, x_hat = x.double(), x_hat.double()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)


def l0(codes: Tensor) -> Tensor:
    """Mean number of nonzero codes per row."""
    return (codes != 0).sum(-1).double().mean()


def dictionary_recovery(atoms: Tensor, ground_truth: Tensor) -> float:
    """Mean over planted atoms of the best cosine similarity with any learned atom (rows)."""
    a = torch.nn.functional.normalize(atoms.double(), dim=-1)
    g = torch.nn.functional.normalize(ground_truth.double(), dim=-1)
    return float((g @ a.T).max(dim=1).values.mean())


class RunningMetrics:
    """Accumulates reconstruction and firing statistics over chunks, in float64."""

    def __init__(self, d_in: int, d_sae: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.sse, self.sum_x, self.sum_x2 = z(()), z(d_in), z(d_in)
        self.sse_std, self.sum_s, self.sum_s2 = z(()), z(d_in), z(d_in)
        self.nnz = z(())
        self.fire_rows = z(d_sae)

    def update(self, x: Tensor, x_hat: Tensor, x_std: Tensor, x_hat_std: Tensor, codes) -> None:
        """Add one chunk; `codes` is a dense (rows, d_sae) tensor or (values, indices) of a top-k model."""
        x, x_hat, x_std, x_hat_std = (t.double() for t in (x, x_hat, x_std, x_hat_std))
        self.n += x.shape[0]
        self.sse += (x - x_hat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_x2 += x.pow(2).sum(0)
        self.sse_std += (x_std - x_hat_std).pow(2).sum()
        self.sum_s += x_std.sum(0)
        self.sum_s2 += x_std.pow(2).sum(0)
        if isinstance(codes, tuple):
            values, indices = codes
            active = values != 0
            self.nnz += active.sum()
            # a row fires a latent at most once in top-k codes, so counting entries counts rows
            self.fire_rows.index_add_(0, indices.reshape(-1), active.reshape(-1).double())
        else:
            active = codes != 0
            self.nnz += active.sum()
            self.fire_rows += active.sum(0)

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        var = (self.sum_x2 - self.sum_x.pow(2) / n).sum().clamp_min(1e-30)
        var_std = (self.sum_s2 - self.sum_s.pow(2) / n).sum().clamp_min(1e-30)
        freq = self.fire_rows / n
        return {
            "rows": self.n,
            "mse": float(self.sse / (n * self.sum_x.numel())),
            "fvu": float(self.sse / var),
            "fvu_standardized": float(self.sse_std / var_std),
            "l0": float(self.nnz / n),
            "dead_fraction": float((self.fire_rows == 0).double().mean()),
            "dense_fraction": float((freq > 0.1).double().mean()),
        }
