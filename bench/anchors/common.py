"""What every anchor shares: the comparison setting, the result record, held-out metrics,
peak-memory metering, batch iteration and a few environment utilities.

Imports only torch, numpy and psutil; never a library under comparison.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

ARCHS = ("topk", "relu-l1")
DTYPES = ("float32", "bfloat16")


@dataclass
class BenchSpec:
    """One comparison setting, shared by every library in a run."""

    arch: str
    """"topk" or "relu-l1"."""
    d_in: int
    d_sae: int
    k: int
    """Active latents per row (top-k); also the L0 target for sklearn's OMP encoder."""
    batch_size: int
    """Rows per optimizer step."""
    lr: float
    """Adam learning rate used by every library under "recommended"."""
    n_train_rows: int
    """Training budget in rows; every library trains floor(n_train_rows / batch_size) steps."""
    l1: float = 0.0
    """L1 coefficient for relu-l1 (each library's own convention, so not L0-matched)."""
    device: str = "cpu"
    dtype: str = "float32"
    """Compute precision under "recommended": float32 | bfloat16 (bf16 autocast on CUDA)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps where the library has one."""
    seed: int = 0
    options: dict = field(default_factory=dict)
    """Library-specific extras, e.g. sklearn_alpha, sklearn_max_rows, sklearn_eval_rows."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.n_train_rows < self.batch_size:
            raise ValueError(f"n_train_rows ({self.n_train_rows}) < batch_size ({self.batch_size})")

    @property
    def n_steps(self) -> int:
        return self.n_train_rows // self.batch_size

    @property
    def rows_trained(self) -> int:
        return self.n_steps * self.batch_size

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def use_bf16(self, settings: str) -> bool:
        """bf16 autocast applies to "recommended" on CUDA with a bfloat16 spec, nowhere else."""
        return settings == "recommended" and self.is_cuda and self.dtype == "bfloat16"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "BenchSpec":
        return cls(**d)


@dataclass
class BenchResult:
    library: str
    settings: str
    """What ran, e.g. "recommended (bf16 autocast)" or "defaults (fp32, signum)"."""
    rows_per_s: float
    """Training rows / training wall seconds (after an untimed warm-up where possible)."""
    train_seconds: float
    fvu: float
    l0: float
    dead_fraction: float
    peak_mem_mb: float
    """CPU: peak RSS minus RSS before training (sampled every 10 ms). CUDA: peak allocated minus
    allocated before training (so the training data already on the GPU is not counted)."""
    error: str | None = None
    extra: dict = field(default_factory=dict)
    """Notes that explain a number: version, rows trained, eval rows, warm-up, timer used."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def failed(cls, library: str, settings: str, error: str, **extra) -> "BenchResult":
        nan = float("nan")
        return cls(library, settings, nan, nan, nan, nan, nan, nan, error=error, extra=extra)


# ---- held-out metrics ---------------------------------------------------------------------
@torch.no_grad()
def heldout_metrics(
    encode_fn: Callable[[Tensor], Tensor],
    decode_fn: Callable[[Tensor], Tensor],
    X_val: Tensor,
    batch: int = 4096,
    *,
    device: str | torch.device | None = None,
) -> dict:
    """FVU, L0 and dead fraction of a trained model on held-out rows.

    fvu = sum((x - x_hat)^2) / sum((x - x.mean(0))^2) over all of X_val; l0 = mean count of
    nonzero codes per row; dead = fraction of latents never nonzero on X_val.

    Args:
        encode_fn: rows (b, d_in) -> dense codes (b, d_sae).
        decode_fn: dense codes (b, d_sae) -> x_hat (b, d_in).
        X_val: (n, d_in) held-out rows, on any device.
        batch: rows per forward call.
        device: where batches are sent before encode_fn (default: X_val's device).
    """
    dev = torch.device(device) if device is not None else X_val.device
    mean = X_val.double().mean(0)
    kept = [] if TRUTH else None
    sse = 0.0
    sst = 0.0
    nnz = 0
    fired = None
    for i in range(0, X_val.shape[0], batch):
        x = X_val[i : i + batch].to(dev, torch.float32)
        codes = encode_fn(x)
        x_hat = decode_fn(codes)
        xd = x.double()
        sse += (xd - x_hat.double()).pow(2).sum().item()
        sst += (xd - mean.to(dev)).pow(2).sum().item()
        nz = codes != 0
        nnz += int(nz.sum().item())
        if kept is not None:
            kept.append(codes.float().cpu())
        f = nz.any(0)
        fired = f if fired is None else fired | f
    n = X_val.shape[0]
    out = {
        "fvu": sse / sst if sst > 0 else float("nan"),
        "l0": nnz / n,
        "dead_fraction": 1.0 - fired.float().mean().item(),
    }
    if kept is not None:
        from bench import synth

        codes = torch.cat(kept)
        decoder = synth.decoder_atoms(lambda c: decode_fn(c.to(dev)).cpu(), codes.shape[1])
        out.update(synth.truth_scores(codes, decoder, TRUTH["codes"], TRUTH["atoms"]))
    return out


TRUTH: dict = {}
"""The planted truth of the held-out rows ({"codes": (n, n_atoms), "atoms": (n_atoms, d)}); when set
(`run_one --truth`), `heldout_metrics` also scores recovery, MCC, precision and recall."""


def metrics_ok(m: dict) -> bool:
    return all(math.isfinite(m[key]) for key in ("fvu", "l0", "dead_fraction"))


def eval_precision_fp32() -> None:
    """Held-out metrics are computed in true fp32 (some libraries switch TF32 on in fit())."""
    torch.set_float32_matmul_precision("highest")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# ---- peak memory ----------------------------------------------------------------------------
class MemoryMeter:
    """Peak memory of what runs inside the `with` block, minus what was there before.

    CPU: a thread samples this process's RSS every 10 ms. CUDA: torch's peak-allocated counter.
    """

    def __init__(self, device: str | torch.device, interval_s: float = 0.01):
        self.cuda = torch.device(device).type == "cuda"
        self.interval_s = interval_s
        self.peak_mb = float("nan")

    def __enter__(self) -> "MemoryMeter":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = (self._peak - self._base) / 2**20


class Timer:
    """Wall seconds of the block; synchronizes CUDA on both ends."""

    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = float("nan")

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0


# ---- data feeding -----------------------------------------------------------------------------
def batch_iter(X: Tensor, batch_size: int, *, seed: int = 0, n_batches: int | None = None) -> Iterator[Tensor]:
    """Batches of X in a fixed order, cycling over epochs (None = forever).

    The first epoch is X in storage order (contiguous slices, no copy): planted data is already
    i.i.d. Later epochs (small data sets trained for many epochs) use a seeded permutation, the
    same for every library.
    """
    n = X.shape[0]
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"{n} rows cannot fill one batch of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    done = 0
    while n_batches is None or done < n_batches:
        perm = None if epoch == 0 else torch.randperm(n, generator=gen).to(X.device)
        for b in range(per_epoch):
            if n_batches is not None and done >= n_batches:
                return
            if perm is None:
                yield X[b * batch_size : (b + 1) * batch_size]
            else:
                yield X[perm[b * batch_size : (b + 1) * batch_size]]
            done += 1
        epoch += 1


def batch_indices(n_rows: int, batch_size: int, n_batches: int, *, seed: int = 0) -> list[Tensor]:
    """Row indices of exactly the batches batch_iter yields (for libraries fed by index)."""
    idx = torch.arange(n_rows)
    return [b.clone() for b in batch_iter(idx, batch_size, seed=seed, n_batches=n_batches)]


def toy_spec(spec: BenchSpec) -> BenchSpec:
    """A 2-step run on a tiny dictionary: run once outside the memory meter so lazy imports and
    thread-pool start-up are not counted as training memory (same for every library)."""
    batch = min(spec.batch_size, 256)
    return dataclasses.replace(spec, d_sae=max(2 * spec.k, 32), batch_size=batch, n_train_rows=2 * batch)


def to_device(X: Tensor, device: str | torch.device) -> Tensor:
    return X.to(device=device, dtype=torch.float32)


def set_threads() -> None:
    torch.set_num_threads(os.cpu_count() or 1)


def free_memory(device: str | torch.device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def package_version(dist_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return "not installed"


def finish(
    library: str,
    settings: str,
    spec: BenchSpec,
    *,
    rows: int,
    seconds: float,
    peak_mb: float,
    metrics: dict,
    **extra,
) -> BenchResult:
    """Assemble a BenchResult from the timed run and the held-out metrics."""
    error = None if metrics_ok(metrics) else "non-finite held-out metrics"
    return BenchResult(
        library=library,
        settings=settings,
        rows_per_s=rows / seconds if seconds > 0 else float("nan"),
        train_seconds=seconds,
        fvu=metrics["fvu"],
        l0=metrics["l0"],
        dead_fraction=metrics["dead_fraction"],
        peak_mem_mb=peak_mb,
        error=error,
        extra={"rows_trained": rows, **{k: v for k, v in metrics.items() if k not in ("fvu", "l0", "dead_fraction")},
               **extra},
    )
