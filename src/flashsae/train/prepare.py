"""`DataPass`: everything done once per pass over the data, shared by every model trained on it.

Opening a pass opens the data (one Source per named stream: `x`, and `y` for a model that maps one
activation to another), fingerprints it, scans it once (statistics and non-finite rows), splits
the rows into training and held-out ids, resolves the batch size and the device, and fits one
standardiser per stream on the training rows. `batches()` then gives the pass's `BatchSource`:
dictionaries of named tensors on the device, whatever the data came from (arrays, files, shard
directories, a model read on the fly). The per-model pieces of setup (CPU threads, the initial
`b_dec`) live here too, so the training run has no setup of its own.

Imports data, preprocess, distributed, the on-the-fly stream and errors; never the loop.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flashsae import distributed
from flashsae.data import open_source, split_rows
from flashsae.data.batching import DeviceBatches, NamedBatches, RowBatches
from flashsae.data.device import pinned_empty, to_device
from flashsae.data.layers import LayerSource
from flashsae.errors import ConfigError, DataError
from flashsae.preprocess import Scan, Standardizer, require_finite, scan, small_op_threads
from flashsae.train import checkpoint
from flashsae.train.spec import RunSpec, model_fields

EVAL_ROWS = 4096
"""Held-out rows of the evaluations during training (the final evaluation reads every held-out row)."""


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch.device; ConfigError when it cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def auto_batch_size(n_train: int) -> int:
    """The default rows per step: 2048, halved (down to 16) until there are at least 8 steps per epoch.

    2048 rather than 4096: twice the steps per row learned more per row on every planted kind, on
    MiniLM activations (held-out FVU 0.120 against 0.130) and at the larger planted shape, for about
    1.1-1.5x the CPU time per row (BENCHMARKS.md, "Rows per step")."""
    b = 2048
    while b > 16 and b * 8 > n_train:
        b //= 2
    return b


DEFAULT_THREADS = torch.get_num_threads()
"""PyTorch's own thread count, read before any run changes it."""


def cpu_threads(threads: int | None, device: torch.device, macs_per_step: int) -> int | None:
    """Threads for PyTorch's CPU kernels: the configured number, 1 for small steps, else PyTorch's default.

    A step of a small SAE is ~100 short kernels; with several OpenMP threads each one waits for the
    slowest worker to wake up, which costs more than the work itself (measured here on 2 cores: a
    d=32, 128-latent step ran 27x faster on one thread than on two under load).
    """
    if threads is not None:
        return threads
    if device.type == "cpu" and macs_per_step < 2**27:
        return 1
    return DEFAULT_THREADS if device.type == "cpu" else None


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


DEVICE_SHARE = 0.25
"""rows_on_device=auto puts the rows on a CUDA device when they take at most this share of its free memory."""


class _Rows:
    """Sources read from memory or files: every stream is a Source with the same rows.

    `tensors`: streams given as tensors on a CUDA device, trained from where they are.
    """

    def __init__(self, streams: dict, tensors: dict | None = None):
        self.streams = streams
        self.tensors = tensors or {}

    def batches(self, train_ids, batch_size: int, *, seed: int, shard: tuple[int, int], device: torch.device):
        """Batches read into reused buffers (page-locked for CUDA) in the rows' stored precision, for
        `to_device`: each must survive one more draw while its copy is in flight (`keep=1`). A large
        batch is gathered on several threads off the CPU only: training on the CPU, the step needs the
        cores, and one reader thread already keeps far ahead of a CPU step."""
        allocate = pinned_empty if device.type == "cuda" else None
        return RowBatches(self.streams, train_ids, batch_size, seed=seed, shard=shard, keep=1, stored=True,
                          allocate=allocate, gather_threads=1 if device.type == "cpu" else None)

    def on_device(self, setting: str, device: torch.device) -> bool:
        """Whether the rows go to `device` once (rows_on_device: auto, yes, no)."""
        if setting != "auto":
            return setting == "yes"
        if device.type != "cuda":
            return False
        if self.tensors and len(self.tensors) == len(self.streams):
            return True
        size = sum(s.n_rows * s.d_in * 4 for s in self.streams.values())
        return size <= DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]

    def device_batches(self, host: RowBatches, device: torch.device, standardizers: dict) -> DeviceBatches:
        """The same batches as `host`, gathered from a copy of every row on `device`, standardised
        there once (the batches are then bit-identical to standardising each one: it is elementwise)."""
        rows = {}
        for name, src in self.streams.items():
            given = self.tensors.get(name)
            if given is not None and given.device == device:
                t = given.float()
            else:
                a = np.asarray(src.read(0, src.n_rows), dtype=np.float32)
                t = torch.from_numpy(a if a.flags.writeable else a.copy()).to(device)
            rows[name] = standardizers[name](t)
        return DeviceBatches(rows, host.iterators["x"])

    def describe(self) -> dict | None:
        return None

    def close(self) -> None:
        pass


class _OnTheFly:
    """A model read on the fly: `x` is its first buffer for the statistics, batches come from the capture."""

    def __init__(self, stream):
        self.stream = stream
        self.streams = {"x": stream.source}

    def batches(self, train_ids, batch_size: int, *, seed: int, shard: tuple[int, int], device: torch.device):
        return NamedBatches(self.stream.batches(train_ids, batch_size, seed=seed), "x")

    def on_device(self, setting: str, device: torch.device) -> bool:
        return False  # the capture never ends: there is no whole set of rows to put anywhere

    def describe(self) -> dict:
        return {"activations": self.stream.describe()}

    def close(self) -> None:
        self.stream.close()


def open_data(data, spec: RunSpec, *, comm: distributed.Comm, resume: bool, show: bool):
    """The pass's data: `_Rows` over one Source per stream, or `_OnTheFly` when `spec.stream` is set."""
    if spec.stream is not None:
        from flashsae.lm.stream import open_stream

        return _OnTheFly(open_stream(spec.stream, device=spec.train.device, world_size=comm.world_size,
                                     resume=resume, progress=show))
    dc = spec.data
    given = data if data is not None and not isinstance(data, (str, Path)) else dc.data
    named = dict(given) if isinstance(given, Mapping) else {"x": given}
    if dc.target is not None:
        if "y" in named:
            raise ConfigError("give the target either as stream 'y' of the data or as target, not both")
        named["y"] = dc.target
    if "x" not in named:
        raise DataError(f"named streams must include 'x'; got {', '.join(map(str, named))}")
    streams, tensors = {}, {}
    for name, value in named.items():
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            tensors[name] = value
        if isinstance(value, (list, tuple)):  # layers read side by side
            streams[name] = LayerSource([open_source(v, key=dc.key) for v in value])
            continue
        is_synthetic = isinstance(value, str) and value == "synthetic"
        streams[name] = open_source(value, key=dc.key, image_shape=dc.image_shape if name == "x" else None,
                                    synthetic=dc.synthetic_params() if is_synthetic else None)
    rows = {s.n_rows for s in streams.values()}
    if len(rows) > 1:
        raise DataError("streams " + ", ".join(f"{n} ({s.n_rows} rows)" for n, s in streams.items())
                        + " must have the same number of rows")
    return _Rows(streams, tensors)


@dataclass
class DataPass:
    """The data side of training, computed once and shared by every model of the pass."""

    data: object                       # _Rows or _OnTheFly
    comm: distributed.Comm
    device: torch.device
    stats: Scan                        # scan of stream x, all rows
    train_ids: np.ndarray              # int64 training row ids
    val_ids: np.ndarray                # int64 held-out row ids (may be empty)
    batch_size: int                    # rows per optimizer step, over all ranks
    standardizers: dict[str, Standardizer]   # one per stream, fitted on the training rows
    fingerprint: str
    seed: int
    rows_on_device: str = "auto"
    _b_dec: dict = field(default_factory=dict)  # initial b_dec by (threads, inputs): computed once

    @classmethod
    def open(cls, data, spec: RunSpec, *, comm: distributed.Comm = distributed.LOCAL, resume: bool = False,
             show: bool = False, standardizers: dict | None = None) -> DataPass:
        """Open, scan, split and standardise `data` as `spec` says; raises the user errors bad data causes.

        `standardizers` (one per stream) are used as they are instead of being fitted: more rows for
        a model that already has its standardisation (the estimator's later `partial_fit` calls).
        """
        opened = open_data(data, spec, comm=comm, resume=resume, show=show)
        try:
            return cls._prepare(opened, spec, comm, show, standardizers)
        except BaseException:
            opened.close()
            raise

    @classmethod
    def _prepare(cls, opened, spec: RunSpec, comm, show: bool, standardizers: dict | None) -> DataPass:
        source = opened.streams["x"]
        fp = checkpoint.fingerprint(source)
        comm.check_same("data", checkpoint.describe(source, fp))
        scans = {name: scan(s, progress=show) for name, s in opened.streams.items()}
        for name, s in scans.items():
            require_finite(s, opened.streams[name], drop_nonfinite=spec.data.drop_nonfinite)
        bad = np.unique(np.concatenate([s.nonfinite_rows for s in scans.values()]))
        train_ids, val_ids = split_rows(source.n_rows, bad, val_fraction=spec.data.val_fraction, seed=spec.train.seed)
        if len(train_ids) == 0:
            raise DataError(f"{source.name} has no usable rows")
        world = comm.world_size
        batch_size = spec.train.batch_size or max(world, auto_batch_size(len(train_ids)) // world * world)
        if batch_size % world:
            raise ConfigError(f"batch_size {batch_size} is not a multiple of the {world} ranks; each rank "
                              "trains on an equal share of every batch")
        if batch_size > len(train_ids):
            raise DataError(f"{source.name} has {len(train_ids)} training rows, fewer than one batch of {batch_size}")
        if standardizers is None:
            standardizers = {name: Standardizer.from_scan(_without(s, opened.streams[name], val_ids),
                                                          spec.data.standardize_for(opened.streams[name].name))
                             for name, s in scans.items()}
        device = comm.device(resolve_device(spec.train.device))
        return cls(opened, comm, device, scans["x"], train_ids, val_ids, batch_size, standardizers, fp,
                   spec.train.seed, spec.train.rows_on_device)

    # ---- what the runs read ---------------------------------------------------------------
    @property
    def source(self):
        """The rows of stream x: statistics, evaluation, pictures."""
        return self.data.streams["x"]

    def model_config(self, spec: RunSpec):
        """`spec`'s model config for this data: its width, training rows and target stream."""
        from flashsae import models

        cls = models.get(spec.architecture)
        missing = [n for n in (*cls.inputs, *cls.targets) if n not in self.data.streams]
        if missing:
            raise DataError(f"architecture {spec.architecture!r} reads stream{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}, which the data lacks: pass named arrays "
                            f"({{'x': ..., '{missing[0]}': ...}}) or, on the command line, --target")
        if "layers" in model_fields(spec.architecture) and spec.model_options.get("layers") is None:
            parts = getattr(self.source, "parts", [self.source])  # one per path given
            spec = dataclasses.replace(spec, model_options={**spec.model_options, "layers": len(parts)})
        return spec.model_config(self.data.streams[cls.inputs[0]].d_in, len(self.train_ids),
                                 self.data.streams[cls.targets[0]].d_in)

    def target_of(self, model):
        """The Source of the stream `model` reconstructs, when it is not x (None for an SAE)."""
        name = model.targets[0]
        return None if name == "x" else self.data.streams[name]

    @property
    def d_in(self) -> int:
        return self.source.d_in

    def eval_ids(self) -> np.ndarray:
        """Rows of the evaluations during training: held-out rows, or training rows when none are held out."""
        return self.val_ids[:EVAL_ROWS] if len(self.val_ids) else self.train_ids[:EVAL_ROWS]

    def final_ids(self) -> np.ndarray:
        """Rows of the final evaluation (held out, else up to 50,000 training rows)."""
        return self.val_ids if len(self.val_ids) else self.train_ids[:50_000]

    def batches(self):
        """The pass's BatchSource: `epoch(e, start_batch)` yields {stream: tensor} on the device, standardised."""
        inner = self.data.batches(self.train_ids, self.batch_size, seed=self.seed,
                                  shard=(self.comm.rank, self.comm.world_size), device=self.device)
        standardizers = {n: s.to(self.device) for n, s in self.standardizers.items()}
        if self.rows_go_to_device():
            return self.data.device_batches(inner, self.device, standardizers)
        return _Standardised(inner, self.device, standardizers)

    def rows_go_to_device(self) -> bool:
        """Whether the batches are gathered from rows held on the device (TrainConfig.rows_on_device)."""
        return self.data.on_device(self.rows_on_device, self.device)

    def data_stats(self) -> dict:
        """config.json's data_stats: what was read and how it was split."""
        src, stats = self.source, self.stats
        out = {"source": src.name, "n_rows": src.n_rows, "d_in": src.d_in,
               "n_train": int(len(self.train_ids)), "n_val": int(len(self.val_ids)),
               "nonfinite_dropped": int(len(stats.nonfinite_rows)),
               "image_shape": list(src.image_shape) if src.image_shape else None,
               "mean_abs_mean": float(np.abs(stats.mean).mean()), "mean_var": float(stats.var.mean()),
               "fingerprint": self.fingerprint}
        out["provenance"] = src.provenance  # a harvest's model, hook and corpus (absolute paths), else None
        target = self.data.streams.get("y")
        if target is not None:
            out["target_provenance"] = target.provenance  # the harvest a transcoder reconstructs
        if len(self.data.streams) > 1:
            out["streams"] = {n: {"source": s.name, "d": s.d_in} for n, s in self.data.streams.items()}
        return {**out, **(self.data.describe() or {})}

    @torch.no_grad()
    def init_b_dec(self, model, threads: int) -> None:
        """b_dec = geometric median of a sample of standardised rows (Weiszfeld's algorithm).

        It depends on the data and the seed only, so one pass computes it once per thread count
        (reductions on different thread counts may round apart) and copies it into every model.
        """
        key = (threads, model.targets)
        if key not in self._b_dec:
            rng = np.random.default_rng(self.seed)
            ids = np.sort(rng.choice(self.train_ids, size=min(4096, len(self.train_ids)), replace=False))
            name = model.targets[0]
            x = self.standardizers[name](torch.from_numpy(self.data.streams[name].take(ids)))
            with small_op_threads(x):  # 30 rounds of small ops: one thread (see small_op_threads)
                m = x.mean(0)
                for _ in range(30):
                    w = 1.0 / (x - m).norm(dim=-1).clamp_min(1e-6)
                    m = (w[:, None] * x).sum(0) / w.sum()
            self._b_dec[key] = m
        model.b_dec.copy_(self._b_dec[key].to(model.b_dec.device))

    def close(self) -> None:
        self.data.close()


class _Standardised:
    """A BatchSource moved to the device and standardised per stream, once for every model of the pass."""

    def __init__(self, inner, device: torch.device, standardizers: dict):
        self.inner, self.device, self.standardizers = inner, device, standardizers

    def batches_per_epoch(self) -> int:
        return self.inner.batches_per_epoch()

    def epoch(self, epoch: int, start_batch: int = 0):
        for batch in to_device(self.inner.epoch(epoch, start_batch), self.device):
            yield {name: self.standardizers[name](t) for name, t in batch.items()}


def _without(stats: Scan, source, val_ids: np.ndarray) -> Scan:
    """Statistics of the training rows: remove the held-out rows' contribution from the full scan."""
    if len(val_ids) == 0:
        return stats
    v = source.take(val_ids).astype(np.float64)
    n_all = source.n_rows - len(stats.nonfinite_rows)
    n_v = v.shape[0]
    n_t = n_all - n_v
    sum_all, sq_all = stats.mean * n_all, (stats.var + stats.mean**2) * n_all
    mean = (sum_all - v.sum(0)) / n_t
    var = np.maximum((sq_all - (v**2).sum(0)) / n_t - mean**2, 0.0)
    msn = (stats.mean_sq_norm * n_all - (v**2).sum()) / n_t
    return dataclasses.replace(stats, n_rows=n_t, mean=mean, var=var, mean_sq_norm=float(msn))


SIDE_BY_SIDE_MACS = 2**29
"""On the CPU, models whose step is below this many multiply-adds (batch x d_in x latents) step on one
thread each, side by side, when a pass has several: at d=64, 512 latents, batch 4096 a step takes
18.8 ms on one thread and 16.3 ms on two, so two models side by side do twice the work in the time."""


def plan_threads(specs: list[RunSpec], dpass: DataPass, workers: int | None) -> list[int]:
    """CPU threads per model of a pass: the count each would use alone (`cpu_threads`), or 1 for all
    when several small models step side by side (see SIDE_BY_SIDE_MACS).

    Not side by side when a spec sets `threads`, `workers` is 1, the pass has one model or the
    machine one core. A model on one thread is bit-identical to `train(..., threads=1)`.
    """
    macs = [dpass.batch_size * dpass.d_in * dpass.model_config(s).d_sae for s in specs]
    side_by_side = (dpass.device.type == "cpu" and len(specs) > 1 and cores() > 1 and workers != 1
                    and all(s.train.threads is None for s in specs) and max(macs) < SIDE_BY_SIDE_MACS)
    if side_by_side:
        return [1] * len(specs)
    return [cpu_threads(s.train.threads, dpass.device, m) or DEFAULT_THREADS for s, m in zip(specs, macs)]
