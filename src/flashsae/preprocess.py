"""Preprocessing: one streaming pass over a Source (statistics + non-finite rows) and the Standardizer.

The Standardizer is an `nn.Module` so that it travels inside a model: its `mean` and `scale`
buffers are saved with the weights, and `mode` is written by the caller into config.json.
Imports only `errors` and `data.device`; never imports models, trainer or cli.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flashsae.data.device import one_thread
from flashsae.errors import ConfigError, DataError

# Upper bound on the values one scan chunk holds, whatever chunk_rows says: 2M values are 16 MiB as
# float64, so the chunk and its deviations stay in a large L3 cache. (409,600 x 256 rows on the 2-core
# EPYC, loaded: 1.1-1.7 s in chunks of 8,192 rows against 3.6-5.8 s in chunks of 65,536.)
_MAX_CHUNK_VALUES = 1 << 21


SMALL_CPU_OP = 1 << 22
"""Elementwise work and reductions on CPU tensors of at most this many values run on one thread
(`small_op_threads`)."""


def small_op_threads(*tensors: Tensor):
    """A context that runs the enclosed torch ops on one thread (`data.device.one_thread`) when every
    tensor given is a CPU tensor of at most SMALL_CPU_OP values (bookkeeping next to the training
    step: standardising a batch, evaluation sums, the initial b_dec). Each such op is well under a
    millisecond of memory traffic, less than waking a second OpenMP thread costs on a busy machine:
    on the 2-core VM with other jobs running, a column sum of 8,192 x 256 floats took 0.12 ms on one
    thread and 12 ms on two, standardising a 4,096 x 256 batch 0.45-1.1 ms against 0.6-23 ms."""
    small = all(t.device.type == "cpu" and t.numel() <= SMALL_CPU_OP for t in tensors)
    return one_thread() if small else nullcontext()


@dataclass
class Scan:
    """Result of one streaming pass over a Source; statistics cover finite rows only."""

    n_rows: int
    """All rows read, finite or not."""

    nonfinite_rows: np.ndarray
    """int64 indices (sorted) of rows holding any NaN or +-Inf."""

    mean: np.ndarray
    """(d_in,) float64 column means."""

    var: np.ndarray
    """(d_in,) float64 population column variances."""

    mean_sq_norm: float
    """Mean over rows of the squared Euclidean row norm, sum_j x_j**2 (uncentred)."""

    @property
    def n_finite(self) -> int:
        return self.n_rows - len(self.nonfinite_rows)


def scan(source, *, chunk_rows: int = 65536, progress: bool = False) -> Scan:
    """Compute column mean/variance, mean squared row norm and non-finite rows in one pass.

    Chunks are reduced in float64 and merged with Chan et al.'s parallel update, so the result
    matches a two-pass computation to float64 rounding, and memory stays bounded by one chunk. A
    chunk costs four passes: the float64 copy, its column means (non-finite rows are searched for
    only when a mean is not finite), the deviations written over the copy, their squares summed.

    Args:
        source: a `flashsae.data.Source` (anything with `n_rows`, `d_in` and `read(start, stop)`).
        chunk_rows: rows per read (capped so one chunk holds at most 16M values).
        progress: show a tqdm bar on stderr.

    Returns:
        A `Scan`.
    """
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    d = source.d_in
    step = max(1, min(chunk_rows, _MAX_CHUNK_VALUES // max(d, 1)))
    n = 0  # finite rows merged so far
    mean = np.zeros(d, np.float64)
    m2 = np.zeros(d, np.float64)  # sum of squared deviations from `mean`
    mean_sq_norm = 0.0
    bad: list[np.ndarray] = []

    from tqdm.auto import tqdm

    with tqdm(total=source.n_rows, unit="rows", disable=not progress, desc="scan") as bar:
        for start in range(0, source.n_rows, step):
            stop = min(start + step, source.n_rows)
            rows = source.read(start, stop)
            x = np.asarray(rows, dtype=np.float64)  # (rows, d)
            own = x is not rows  # a float64 copy of our own, which the deviations may overwrite
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in a sum: found just below
                mean_b = x.mean(axis=0)
            if not np.isfinite(mean_b).all():  # a NaN or Inf anywhere makes its column's mean non-finite
                finite = np.isfinite(x).all(axis=1)
                bad.append(np.flatnonzero(~finite).astype(np.int64) + start)
                x, own = x[finite], True
                mean_b = x.mean(axis=0) if x.shape[0] else mean_b
            n_b = x.shape[0]
            if n_b:
                dev = np.subtract(x, mean_b, out=x if own else None)
                m2_b = np.einsum("ij,ij->j", dev, dev)
                # sum of squares = sum of squared deviations + n * mean^2, per column (no cancellation)
                sq_b = float(m2_b.sum() + n_b * np.dot(mean_b, mean_b)) / n_b
                total = n + n_b
                delta = mean_b - mean  # Chan, Golub & LeVeque (1979), pairwise merge
                mean = mean + delta * (n_b / total)
                m2 = m2 + m2_b + delta**2 * (n * n_b / total)
                mean_sq_norm += (sq_b - mean_sq_norm) * (n_b / total)
                n = total
            bar.update(stop - start)

    nonfinite = np.concatenate(bad) if bad else np.zeros(0, np.int64)
    var = m2 / n if n else np.zeros(d, np.float64)
    return Scan(n_rows=source.n_rows, nonfinite_rows=nonfinite, mean=mean, var=var,
                mean_sq_norm=float(mean_sq_norm))



def require_finite(stats: Scan, source, *, drop_nonfinite: bool) -> None:
    """Refuse data with NaN or Inf rows unless they are to be dropped (the scan found them)."""
    bad = stats.nonfinite_rows
    if len(bad) and not drop_nonfinite:
        raise DataError(f"{source.name}: {len(bad)} of {source.n_rows} rows contain NaN or Inf "
                        f"(first at row {int(bad[0])}); pass --drop-nonfinite to skip them")

class Standardizer(nn.Module):
    """Affine input map `x_std = (x - mean) / scale`, fitted from a `Scan`.

    Modes:
        column: per-column mean and standard deviation (a constant column gets scale 1).
        global: per-column mean, one scale sqrt(mean_j var_j) shared by all columns, so
            relative column magnitudes survive.
        norm: no centring; one scale c = sqrt(mean_sq_norm / d_in), the RMS of the entries, so
            the mean squared row norm becomes d_in (entries of unit RMS), which makes one
            set of hyperparameters work across layers whose activation scales differ.
        none: identity.

    Buffers `mean` (d_in,) and `scale` (d_in,) are float32; identity until fitted.
    """

    MODES = ("column", "global", "norm", "none")

    def __init__(self, d_in: int, mode: str = "column"):
        super().__init__()
        if mode not in self.MODES:
            raise ConfigError(f"unknown standardization mode {mode!r}; choose one of: {', '.join(self.MODES)}")
        if d_in < 1:
            raise ConfigError(f"d_in must be >= 1, got {d_in}")
        self.mode = mode
        self.register_buffer("mean", torch.zeros(d_in, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(d_in, dtype=torch.float32))

    @classmethod
    def from_scan(cls, scan: Scan, mode: str) -> "Standardizer":
        """Build a fitted Standardizer from streaming statistics."""
        d = len(scan.mean)
        self = cls(d, mode)
        mean = np.zeros(d, np.float64)
        scale = np.ones(d, np.float64)
        if mode == "column":
            mean = scan.mean
            std = np.sqrt(scan.var)
            # Below float32 resolution of the column's own magnitude the "variance" is rounding
            # noise of a constant column; dividing by it would blow that noise up to unit scale.
            constant = std <= np.finfo(np.float32).eps * np.abs(mean) + np.finfo(np.float32).tiny
            scale = np.where(constant, 1.0, std)
        elif mode == "global":
            mean = scan.mean
            s = float(np.sqrt(np.mean(scan.var)))
            scale = np.full(d, s if s > np.finfo(np.float32).tiny else 1.0)
        elif mode == "norm":
            c = float(np.sqrt(scan.mean_sq_norm / d))
            scale = np.full(d, c if c > np.finfo(np.float32).tiny else 1.0)
        self.mean.copy_(torch.from_numpy(np.asarray(mean, np.float32)))
        self.scale.copy_(torch.from_numpy(np.asarray(scale, np.float32)))
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Standardise `x` (..., d_in); computes in x.dtype on x.device (a small CPU batch on one
        thread, `small_op_threads`)."""
        if self.mode == "none":
            return x
        with small_op_threads(x):
            return torch.sub(x, self.mean.to(x.device, x.dtype)).div_(self.scale.to(x.device, x.dtype))

    def inverse(self, x_std: Tensor) -> Tensor:
        """Map standardised values (..., d_in) back to input units."""
        if self.mode == "none":
            return x_std
        with small_op_threads(x_std):
            return x_std * self.scale.to(x_std.device, x_std.dtype) + self.mean.to(x_std.device, x_std.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.mean.shape[0]}, mode={self.mode!r}"
