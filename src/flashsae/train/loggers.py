"""Where the training log goes besides train_log.csv: JSON lines, live curves, TensorBoard, W&B.

`TrainingLogs` receives every log row of the training loop (`log(row)`) and fans it out to the
sinks a run asked for. The sinks only read rows; they never touch the model, the trainer or the
random state, so logging cannot change the numbers a run produces. tensorboard and wandb are
optional packages, imported when a run asks for them. Imports only io, errors and viz.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from flashsae import io
from flashsae.errors import ConfigError

WANDB_PROJECT = "flashsae"

# Log-row keys and where they appear in TensorBoard / W&B ("" means the row has no value yet).
_SCALARS = {"loss": "train/loss", "mse": "train/mse", "fvu_standardized": "train/fvu_standardized",
            "l0": "train/l0", "aux_loss": "train/aux_loss", "dead_fraction_window": "train/dead_fraction_window",
            "lr": "train/lr", "val_fvu_standardized": "val/fvu_standardized", "val_l0": "val/l0"}


def require_tensorboard():
    """Return torch's SummaryWriter class, or raise ConfigError when tensorboard is missing."""
    try:
        import tensorboard  # noqa: F401  (SummaryWriter needs it and says so less clearly)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard is not installed; pip install tensorboard") from None
    return SummaryWriter


def require_wandb():
    """Return the wandb module, or raise ConfigError when it is missing."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb is not installed; pip install wandb") from None
    return wandb


def check_options(*, tensorboard: bool, wandb: bool, has_out: bool) -> None:
    """Fail early (before any data is read) when a requested log sink cannot work.

    Raises:
        ConfigError: tensorboard or wandb is requested but not installed, or tensorboard without
            an output directory.
    """
    if tensorboard:
        require_tensorboard()
        if not has_out:
            raise ConfigError("tensorboard logging needs an output directory (out=...)")
    if wandb:
        require_wandb()


def _clean(row: dict) -> dict:
    """The row with empty cells as None and non-finite floats as None (valid JSON)."""
    out = {}
    for key, value in row.items():
        if value == "" or (isinstance(value, float) and not math.isfinite(value)):
            value = None
        out[key] = value
    return out


def _scalars(row: dict) -> dict[str, float]:
    return {tag: float(row[key]) for key, tag in _SCALARS.items() if isinstance(row.get(key), (int, float))}


class JsonlLog:
    """train_log.jsonl: one JSON object per log row, flushed as it is written.

    Opening rewrites the file from the rows already in the history, so a resumed run's log holds
    each step once (rows logged after the last checkpoint are dropped, as in the CSV).
    """

    def __init__(self, path: Path, history: list[dict]):
        self.path = Path(path)
        io.atomic_write_text(self.path, "".join(json.dumps(_clean(r)) + "\n" for r in history))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, row: dict) -> None:
        self._file.write(json.dumps(_clean(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


LIVE_CURVES_AFTER_S = 20.0
"""Seconds of training before curves.png is first redrawn mid-run (a short run gets it at the end)."""


class LiveCurves:
    """curves.png redrawn while training, at held-out evaluations, so a long run can be watched.

    A redraw happens at an evaluation row when at least `min_fraction` of the run's steps have
    passed since the last one, training has run `LIVE_CURVES_AFTER_S` seconds, and the time since
    the last redraw is at least 1/max_overhead times what that redraw took (plotting stays under
    `max_overhead` of the wall time). `clock` tells the run's training time: wall time by default;
    a model that shares a data pass with others passes its own share, so that the redraws of all
    the models together stay under `max_overhead` and a short model is drawn only at the end.
    """

    def __init__(self, path: Path, history: list[dict], total_steps: int, *, min_fraction: float = 0.1,
                 max_overhead: float = 0.1, clock=time.perf_counter):
        self.path = Path(path)
        self.history = history
        self.min_steps = max(1, math.ceil(min_fraction * total_steps))
        self.max_overhead = max_overhead
        self.last_step = history[-1]["step"] if history else 0
        self.clock = clock
        self.next_time = clock() + LIVE_CURVES_AFTER_S

    def log(self, row: dict) -> None:
        if row.get("val_fvu_standardized") in ("", None) or row["step"] - self.last_step < self.min_steps:
            return
        if self.clock() < self.next_time:
            return
        from flashsae.viz import plots

        t0 = time.perf_counter()
        plots.training_curves(self.history, self.path)
        took = time.perf_counter() - t0
        self.last_step = row["step"]
        self.next_time = self.clock() + took / self.max_overhead

    def close(self) -> None:
        pass


class TensorBoardLog:
    """TensorBoard event files under `<run>/tensorboard`, one scalar per log-row value."""

    def __init__(self, log_dir: Path, run_config: dict, *, resume_step: int | None):
        SummaryWriter = require_tensorboard()
        # purge_step drops events a resumed run will log again (those after the last checkpoint).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2) + "\n```", 0)

    def log(self, row: dict) -> None:
        for tag, value in _scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])

    def summary(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"final/{key}", float(value), step)

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """A Weights & Biases run (wandb's own settings apply: WANDB_MODE=offline, WANDB_PROJECT, ...)."""

    def __init__(self, run_dir: Path | None, run_config: dict):
        import os

        wandb = require_wandb()
        kwargs = {"project": os.environ.get("WANDB_PROJECT", WANDB_PROJECT), "config": run_config}
        if run_dir is not None:
            kwargs["dir"] = str(run_dir)
            kwargs["name"] = _run_name(run_dir)
        self.run = wandb.init(**kwargs)

    def log(self, row: dict) -> None:
        self.run.log(_scalars(row), step=row["step"])

    def summary(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def close(self) -> None:
        self.run.finish()


def _run_name(work: Path) -> str:
    name = Path(work).name
    return name[: -len(".partial")] if name.endswith(".partial") else name


class TrainingLogs:
    """Every sink a run writes its log rows to (besides train_log.csv, which the loop writes)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, work: Path | None, run_config: dict, history: list[dict], *, total_steps: int,
             resume_step: int | None = None, tensorboard: bool = False, wandb: bool = False,
             clock=time.perf_counter) -> "TrainingLogs":
        """Open the sinks. Optional packages are checked first, so a missing one fails before any file is opened.

        Args:
            work: the run directory being written, or None for an in-memory run (no files).
            run_config: what config.json holds (sent to TensorBoard and W&B as the run's config).
            history: log rows so far (non-empty when resuming); the live curves read it as it grows.
            total_steps: steps the run will take (spacing of the live curves).
            resume_step: the step a resumed run restarts from; None for a fresh run.
            clock: the run's training time in seconds (paces the live curves; see `LiveCurves`).
        """
        check_options(tensorboard=tensorboard, wandb=wandb, has_out=work is not None)
        sinks: list = []
        try:
            if work is not None:
                sinks.append(JsonlLog(work / io.JSONL_LOG_FILE, history))
                sinks.append(LiveCurves(work / io.CURVES_FILE, history, total_steps, clock=clock))
            if tensorboard:
                sinks.append(TensorBoardLog(work / io.TENSORBOARD_DIR, run_config, resume_step=resume_step))
            if wandb:
                sinks.append(WandbLog(work, run_config))
        except BaseException:
            cls(sinks).close()
            raise
        return cls(sinks)

    def log(self, row: dict) -> None:
        for sink in self.sinks:
            sink.log(row)

    def summary(self, metrics: dict, step: int) -> None:
        """Final held-out metrics, for the sinks that keep a run summary."""
        for sink in self.sinks:
            if hasattr(sink, "summary"):
                sink.summary(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
