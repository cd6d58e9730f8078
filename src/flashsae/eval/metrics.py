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
    """Accumulates reconstruction and firing statistics over chunks.

    Everything is computed in the standardised space the model works in: the residual, per column,
    and the target's column sums, shifted by the first chunk's column means (so that a variance
    computed from them loses no digits to a large mean). The data-unit metrics follow exactly from
    those with the standardiser's per-column `scale` (x - x_hat = (x_std - x_hat_std) * scale, and
    likewise every column's variance), with no inverse map and no data-unit copy of the chunk.
    Each chunk is reduced in its own precision (float32) in a few passes; the per-chunk partial
    sums are accumulated in float64.
    """

    def __init__(self, d_in: int, d_sae: int, device, scale: Tensor | None = None):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.scale2 = None if scale is None else scale.to(device, torch.float64).pow(2)  # (d_in,)
        self.sse_col, self.sum_s, self.sum_s2 = z(d_in), z(d_in), z(d_in)
        self.shift: Tensor | None = None  # (d_in,) in the chunks' dtype
        self.nnz = z(())
        self.fire_rows = z(d_sae)

    def update(self, x_std: Tensor, x_hat_std: Tensor, codes) -> None:
        """Add one chunk of standardised targets and reconstructions; `codes` is a dense (rows, d_sae)
        tensor or (values, indices) of a top-k model."""
        if x_hat_std.dtype != x_std.dtype:
            x_hat_std = x_hat_std.to(x_std.dtype)
        self.n += x_std.shape[0]
        work = torch.sub(x_std, x_hat_std)  # the residual, then the shifted targets: one buffer
        self.sse_col += work.mul_(work).sum(0).double()
        if self.shift is None:
            self.shift = x_std.mean(0)
        torch.sub(x_std, self.shift, out=work)
        self.sum_s += work.sum(0).double()
        self.sum_s2 += work.mul_(work).sum(0).double()
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
        var_col = (self.sum_s2 - self.sum_s.pow(2) / n).clamp_min(0)  # per column, standardised units
        scale2 = self.scale2 if self.scale2 is not None else torch.ones_like(var_col)
        sse = (self.sse_col * scale2).sum()
        freq = self.fire_rows / n
        return {
            "rows": self.n,
            "mse": float(sse / (n * var_col.numel())),
            "fvu": float(sse / (var_col * scale2).sum().clamp_min(1e-30)),
            "fvu_standardized": float(self.sse_col.sum() / var_col.sum().clamp_min(1e-30)),
            "l0": float(self.nnz / n),
            "dead_fraction": float((self.fire_rows == 0).double().mean()),
            "dense_fraction": float((freq > 0.1).double().mean()),
        }
