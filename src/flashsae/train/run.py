"""The whole training job: data -> standardiser -> batches -> trainer -> evaluation -> run directory.

`train()` is the one entry point behind the Python API, the CLI and the scikit-learn estimator.
The loop is short: steps, a log line every `log_every` steps (the only device reads), held-out
evaluation with early stopping, checkpoints, and interruption.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from flashsae import distributed, io
from flashsae.config import DataConfig, TrainConfig, to_dict
from flashsae.data import BatchIterator, open_source, split_rows
from flashsae.data.device import to_device
from flashsae.data.stream import open_stream, pop_stream_options
from flashsae.errors import ConfigError, DataError
from flashsae.eval.evaluate import evaluate
from flashsae.preprocess import Scan, Standardizer, require_finite, scan
from flashsae.train import checkpoint, loggers
from flashsae.train.options import make_model_config, split_options
from flashsae.train.trainer import Trainer

LOG_COLUMNS = ("step", "rows_seen", "loss", "mse", "fvu", "l0", "aux_loss", "dead_fraction", "lr",
               "val_fvu", "val_l0", "elapsed_s")


@dataclass
class TrainResult:
    metrics: dict                 # held-out metrics of the final model
    train_seconds: float          # wall time of the training loop (steps only, no setup or final eval)
    rows_seen: int
    steps: int
    run_dir: Path | None
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False

    @property
    def rows_per_s(self) -> float:
        return self.rows_seen / max(self.train_seconds, 1e-9)


class Interrupted(Exception):
    """Training stopped by a signal; a checkpoint was written. `signum` is the signal's number, if known."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def train(data=None, *, out=None, overwrite: bool = False, resume: bool = False, quiet: bool = False,
          progress: bool | None = None, tensorboard: bool = False, wandb: bool = False,
          dist_timeout: float = distributed.DEFAULT_TIMEOUT_S, comm: distributed.Comm | None = None,
          stop_after_steps: int | None = None, **options):
    """Train a sparse autoencoder.

    Args:
        data: array-like (rows, features), a path (.npy, .npz, .csv, .tsv, .safetensors, shard
            directory) or a built-in name ('digits', 'synthetic'); None means 'digits'.
        out: run directory to write (model, config, metrics, log, plots); None keeps it in memory.
        overwrite: replace an existing `out`.
        resume: continue from the checkpoint left in `<out>.partial`.
        quiet: no progress bar or summary.
        stop_after_steps: stop as if interrupted after this many steps, leaving a checkpoint for
            `resume` (for testing crash recovery and for splitting a job).
        tensorboard: also write TensorBoard event files to `<out>/tensorboard` (needs tensorboard).
        wandb: also log to a Weights & Biases run (needs wandb; WANDB_MODE=offline works offline).
        dist_timeout: under torchrun, seconds a rank waits for the others before failing.
        comm: the process group to train in; None joins torchrun's (data parallel) when WORLD_SIZE > 1,
            `flashsae.distributed.LOCAL` trains alone (each rank of a sweep).
        **options: fields of DataConfig, TrainConfig and the architecture's model config
            (`architecture`/`arch`, `d_sae`/`latents`, `k`, `l1`, ...).

    Returns:
        (model, TrainResult)
    """
    comm = comm if comm is not None else distributed.from_env(dist_timeout)
    show = ((not quiet) if progress is None else progress) and comm.is_main()
    if out is None and resume:
        raise ConfigError("resume needs an output directory")
    loggers.check_options(tensorboard=tensorboard, wandb=wandb, has_out=out is not None)
    # Validate now; the directory itself is created once the data and options have been checked, so
    # that a user error leaves nothing behind.
    work = io.prepare_out(out, overwrite=overwrite, resume=resume, create=False) if out is not None else None
    saved = io.read_json(work / io.CONFIG_FILE) if resume else None
    resume_from, work = work, (work if comm.is_main() else None)  # only rank 0 writes
    stream_cfg = pop_stream_options(options, data)  # --model/--hook/--text: training on the fly
    if saved is not None:
        options = {**saved["data"], **saved["train"], **{k: v for k, v in saved["model"].items() if k != "d_in"},
                   "architecture": saved["architecture"]}
    if data is not None and not isinstance(data, (str, Path)):
        options.setdefault("data", "<array>")
    elif data is not None:
        options["data"] = str(data)
    architecture, data_opts, train_opts, model_opts = split_options(options)
    data_cfg = DataConfig(**data_opts)
    train_cfg = TrainConfig(**train_opts)
    spec = data if data is not None and not isinstance(data, (str, Path)) else data_cfg.data
    stream = open_stream(stream_cfg, device=train_cfg.device, world_size=comm.world_size, resume=resume,
                         progress=show)  # None unless training on the fly
    source = stream.source if stream is not None else open_source(
        spec, key=data_cfg.key, image_shape=data_cfg.image_shape,
        synthetic=data_cfg.synthetic_params() if isinstance(spec, str) and spec == "synthetic" else None)
    if saved is not None and source.d_in != saved["model"]["d_in"]:
        raise DataError(f"{source.name} has {source.d_in} columns but the checkpoint was trained on "
                        f"{saved['model']['d_in']}")
    data_fp = checkpoint.fingerprint(source)
    if saved is not None:
        checkpoint.check_same_data(saved, source, data_fp, resume_from)
    comm.check_same("data", checkpoint.describe(source, data_fp))
    model_cfg = make_model_config(architecture, model_opts, source.d_in)
    device = comm.device(resolve_device(train_cfg.device))
    torch.manual_seed(train_cfg.seed)

    rows = _prepare_rows(source, data_cfg, train_cfg, comm, show)
    stats, train_ids, val_ids, batch_size, standardizer = rows
    threads = _cpu_threads(train_cfg, device, batch_size * source.d_in * model_cfg.d_sae)
    if threads is not None:
        torch.set_num_threads(threads)

    from flashsae import models

    model = models.get(architecture)(model_cfg, standardizer).to(device)
    total_steps, dead_after, eval_every = _schedule(train_cfg, len(train_ids), batch_size)
    trainer = Trainer(model, train_cfg, total_steps=total_steps, dead_after_rows=dead_after, comm=comm)
    batches = BatchIterator(source, train_ids, batch_size, seed=train_cfg.seed, shard=(comm.rank, comm.world_size)) \
        if stream is None else stream.batches(train_ids, batch_size, seed=train_cfg.seed)
    per_epoch = batches.batches_per_epoch()
    eval_ids = val_ids[:4096] if len(val_ids) else train_ids[:4096]

    run_config = _run_config(architecture, model_cfg, train_cfg, data_cfg, source, rows, data_fp,
                             {"batch_size": batch_size, "total_steps": total_steps, "lr": trainer.base_lr,
                              "dtype": trainer.dtype, "dead_after_rows": dead_after, "device": str(device),
                              "world_size": comm.world_size})
    if stream is not None:
        run_config["data_stats"]["activations"] = stream.describe()

    state = {"step": 0, "rows_seen": 0, "history": [], "best": math.inf, "since_best": 0, "elapsed": 0.0}
    if resume:
        state = checkpoint.load(resume_from, model, trainer)
    else:
        init_b_dec(model, source, train_ids, train_cfg.seed)
        if work is not None:
            io.prepare_out(out, overwrite=overwrite, resume=False, create=True)
            io.write_json(work / io.CONFIG_FILE, run_config)
    comm.broadcast_module_(model)  # every rank starts from rank 0's weights and standardiser

    logs = loggers.TrainingLogs.open(work, run_config, state["history"], total_steps=total_steps,
                                     resume_step=state["step"] + 1 if resume else None,
                                     tensorboard=tensorboard and comm.is_main(), wandb=wandb and comm.is_main())
    try:
        interrupted = _train_loop(trainer, batches, per_epoch, total_steps, state, source, eval_ids, eval_every,
                                  train_cfg, work, show, on_log=logs.log, stop_after_steps=stop_after_steps)
        metrics = _final_metrics(model, source, rows, state, show)
        logs.summary(metrics, state["step"])
    finally:
        logs.close()
        if stream is not None:
            stream.close()
    result = TrainResult(metrics, state["elapsed"], state["rows_seen"], state["step"], None, state["history"],
                         interrupted)
    if work is not None and not interrupted:
        result.run_dir = _write_run(work, out, model, run_config, metrics, state["history"], source,
                                    val_ids if len(val_ids) else train_ids)
    elif work is not None:
        result.run_dir = work
    if show and not interrupted:
        _summary(metrics, result.run_dir)
    return model, result


class PreparedRows(NamedTuple):
    """The data side of a run, computed once per data pass (shared by every model trained on it)."""

    stats: Scan                  # statistics of all rows (the scan)
    train_ids: np.ndarray        # int64 training row ids
    val_ids: np.ndarray          # int64 held-out row ids (may be empty)
    batch_size: int              # resolved rows per optimizer step, over all ranks
    standardizer: Standardizer   # fitted on the training rows


def _prepare_rows(source, data_cfg: DataConfig, train_cfg: TrainConfig, comm, show: bool) -> PreparedRows:
    """One streaming pass (statistics and non-finite rows), the train/held-out split, the batch size and the
    standardiser; raises the user errors a bad data set or batch size causes."""
    stats = scan(source, progress=show)
    require_finite(stats, source, drop_nonfinite=data_cfg.drop_nonfinite)
    train_ids, val_ids = split_rows(source.n_rows, stats.nonfinite_rows, val_fraction=data_cfg.val_fraction,
                                    seed=train_cfg.seed)
    if len(train_ids) == 0:
        raise DataError(f"{source.name} has no usable rows")
    world = comm.world_size
    batch_size = train_cfg.batch_size or max(world, auto_batch_size(len(train_ids)) // world * world)
    if batch_size % comm.world_size:
        raise ConfigError(f"batch_size {batch_size} is not a multiple of the {comm.world_size} ranks; each rank "
                          "trains on an equal share of every batch")
    if batch_size > len(train_ids):
        raise DataError(f"{source.name} has {len(train_ids)} training rows, fewer than one batch of {batch_size}")
    standardizer = Standardizer.from_scan(_exclude_rows(stats, source, val_ids), data_cfg.standardize)
    return PreparedRows(stats, train_ids, val_ids, batch_size, standardizer)


def _schedule(cfg: TrainConfig, n_train: int, batch_size: int) -> tuple[int, int, int]:
    """(total_steps, dead_after_rows, eval_every) of a run."""
    total_steps = max(1, _total_rows(cfg, n_train) // batch_size)
    dead_after = cfg.dead_after_rows or max(batch_size, min(10_000_000, total_steps * batch_size // 10))
    eval_every = max(1, total_steps // 10) if cfg.eval_every is None else (cfg.eval_every or total_steps)
    return total_steps, dead_after, eval_every


def _run_config(architecture: str, model_cfg, train_cfg: TrainConfig, data_cfg: DataConfig, source,
                rows: PreparedRows, data_fp: str, resolved: dict) -> dict:
    """What config.json holds: exactly what ran, the data's statistics and the resolved defaults."""
    stats = rows.stats
    return {
        "format_version": io.FORMAT_VERSION,
        "library": "flashsae",
        "library_version": _version(),
        "architecture": architecture,
        "model": model_cfg.to_dict(),
        "train": to_dict(train_cfg),
        "data": to_dict(data_cfg),
        "preprocess": {"mode": rows.standardizer.mode},
        "data_stats": {"source": source.name, "n_rows": source.n_rows, "d_in": source.d_in,
                       "n_train": int(len(rows.train_ids)), "n_val": int(len(rows.val_ids)),
                       "nonfinite_dropped": int(len(stats.nonfinite_rows)),
                       "image_shape": list(source.image_shape) if source.image_shape else None,
                       "mean_abs_mean": float(np.abs(stats.mean).mean()), "mean_var": float(stats.var.mean()),
                       "fingerprint": data_fp},
        "resolved": resolved,
    }


def _final_metrics(model, source, rows: PreparedRows, state: dict, show: bool) -> dict:
    """Held-out metrics of the trained model (training rows when nothing is held out) plus the run's counts."""
    model.eval()
    held_out = len(rows.val_ids) > 0
    metrics = dict(evaluate(model, source, rows.val_ids if held_out else rows.train_ids[:50_000], progress=show))
    metrics.update(rows_seen=state["rows_seen"], steps=state["step"], train_seconds=round(state["elapsed"], 3),
                   rows_per_s=round(state["rows_seen"] / max(state["elapsed"], 1e-9), 1),
                   evaluated_on="held-out" if held_out else "training rows")
    return metrics


def _train_loop(trainer, batches, per_epoch, total_steps, state, source, eval_ids, eval_every, cfg, work, show,
                on_log=None, stop_after_steps=None):
    """Steps until done; `on_log(row)` sees each log row after it joins the history (extra log sinks)."""
    model = trainer.model
    device = model.W_dec.device
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)
    acc = None
    n_acc = 0
    stop = {"signal": None}
    old_handlers = _install_signal_handlers(stop)
    t0 = time.perf_counter() - state["elapsed"]
    interrupted = False
    comm = trainer.comm
    try:
        while state["step"] < total_steps:
            epoch, start = divmod(state["step"], per_epoch)
            for raw in to_device(batches.epoch(epoch, start_batch=start), device):
                x = model.standardizer(raw)
                m = trainer.step(x)
                acc = torch.stack(m) if acc is None else acc + torch.stack(m)
                n_acc += 1
                state["step"] += 1
                state["rows_seen"] += raw.shape[0] * comm.world_size
                step = state["step"]
                done = step >= total_steps
                at_log = step % cfg.log_every == 0 or done or step % eval_every == 0
                if at_log:
                    row, t0 = _log_step(trainer, acc / n_acc, state, t0, source, eval_ids,
                                        evaluate_now=step % eval_every == 0 or done)
                    acc, n_acc = None, 0
                    if on_log is not None:
                        on_log(row)
                    if bar is not None:
                        bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", refresh=False)
                    if work is not None:
                        _write_log(work / io.LOG_FILE, state["history"])
                if bar is not None:
                    bar.update(1)
                if work is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not done:
                    state["elapsed"] = time.perf_counter() - t0
                    checkpoint.save(work, model, trainer, state)
                if cfg.patience and state["since_best"] >= cfg.patience:
                    total_steps = step  # early stop
                if stop_after_steps is not None and step >= stop_after_steps and not done:
                    stop["signal"] = "stop_after_steps"
                # A signal may reach some ranks only: ranks agree at log steps (their one sync point).
                if stop["signal"] == "stop_after_steps" or comm.agree_stop(stop["signal"] is not None,
                                                                          sync_point=at_log):
                    stop["signal"] = stop["signal"] or "a signal to another rank"
                    raise Interrupted(stop["signal"])  # caught below
                if step >= total_steps:
                    break
    except (Interrupted, KeyboardInterrupt):
        interrupted = True
        state["elapsed"] = time.perf_counter() - t0
        if work is not None:
            checkpoint.save(work, model, trainer, state)
        if stop["signal"] != "stop_after_steps":
            name = stop["signal"]
            signum = getattr(signal, name, None) if isinstance(name, str) and name.startswith("SIG") else None
            raise Interrupted(f"training interrupted by {name or 'an interrupt'} at step {state['step']}; "
                              f"a checkpoint was written, continue with --resume", signum) from None
    finally:
        _restore_signal_handlers(old_handlers)
        if bar is not None:
            bar.close()
    if not interrupted:
        state["elapsed"] = time.perf_counter() - t0
    return interrupted


def _log_step(trainer, step_means, state: dict, t0: float, source, eval_ids, *,
              evaluate_now: bool) -> tuple[dict, float]:
    """A log step of one model (train() and each model of train_many): the log row from the step
    metrics averaged since the last one (over ranks too), the AuxK switch, and at evaluation steps
    the held-out check, whose time is taken out of the training time. Appends the row to the
    history; returns it with the shifted start time `t0`."""
    comm = trainer.comm
    row = _log_row(trainer, comm.all_reduce_mean_(step_means), state, t0)
    trainer.refresh_aux()
    if evaluate_now:
        t_eval = time.perf_counter()
        v = evaluate(trainer.model, source, eval_ids)
        trainer.model.train()
        t0 += time.perf_counter() - t_eval  # train_seconds counts training only
        # Every rank evaluates the same rows; rank 0's numbers make the early-stopping call.
        v["fvu_standardized"], v["l0"] = comm.broadcast_(
            torch.tensor([v["fvu_standardized"], v["l0"]], dtype=torch.float64)).tolist()
        _record_eval(state, row, v)
    state["history"].append(row)
    return row, t0


def _record_eval(state: dict, row: dict, v: dict) -> None:
    """Put a held-out evaluation into the log row and the early-stopping state."""
    row["val_fvu"], row["val_l0"] = v["fvu_standardized"], v["l0"]
    if v["fvu_standardized"] < state["best"] * (1 - 1e-3):
        state["best"], state["since_best"] = v["fvu_standardized"], 0
    else:
        state["since_best"] += 1


def _log_row(trainer, means, state, t0) -> dict:
    loss, mse, var, l0, aux = means.tolist()  # the one device read per log interval
    dead = float(trainer.dead_mask().float().mean())
    return {"step": state["step"], "rows_seen": state["rows_seen"], "loss": loss, "mse": mse,
            "fvu": mse / max(var, 1e-12), "l0": l0, "aux_loss": aux, "dead_fraction": dead,
            "lr": trainer.optimizer.param_groups[0]["lr"], "val_fvu": "", "val_l0": "",
            "elapsed_s": round(time.perf_counter() - t0, 3)}


def _write_log(path: Path, history: list[dict]) -> None:
    lines = [",".join(LOG_COLUMNS)]
    for row in history:
        lines.append(",".join(_fmt(row.get(c, "")) for c in LOG_COLUMNS))
    with io._atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _install_signal_handlers(stop: dict):
    def handler(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    old = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        return {}
    return old


def _restore_signal_handlers(old: dict) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


def _write_run(work: Path, out, model, run_config, metrics, history, source, sample_ids=None) -> Path:
    io.save_model(work, model, run_config)
    io.write_json(work / io.METRICS_FILE, metrics)
    _write_log(work / io.LOG_FILE, history)
    from flashsae.viz import plots

    plots.training_curves(history, work / io.CURVES_FILE)
    if source.image_shape is not None:
        plots.atom_atlas(model.atoms().cpu().numpy(), tuple(source.image_shape), work / io.ATLAS_FILE)
        if sample_ids is not None and len(sample_ids):
            plots.reconstructions(model, source.take(np.asarray(sample_ids[:6])), tuple(source.image_shape),
                                  work / io.RECONSTRUCTIONS_FILE)
    return io.finalize(work, out)


def _summary(metrics: dict, run_dir) -> None:
    parts = [f"FVU {metrics['fvu']:.4f}", f"L0 {metrics['l0']:.2f}", f"dead {100 * metrics['dead_fraction']:.1f}%"]
    if "recovery" in metrics:
        parts.append(f"recovery {metrics['recovery']:.3f}")
    parts.append(f"{metrics['rows_per_s']:,.0f} rows/s")
    print(f"{metrics['evaluated_on']}: " + ", ".join(parts) + (f" -> {run_dir}" if run_dir else ""))


_DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own choice, before any run changes it


def _cpu_threads(cfg: TrainConfig, device: torch.device, macs_per_step: int) -> int | None:
    """Threads for PyTorch's CPU kernels: the configured number, 1 for small steps, else PyTorch's default.

    A step of a small SAE is ~100 short kernels; with several OpenMP threads each one waits for the
    slowest worker to wake up, which costs more than the work itself (measured here on 2 cores: a
    d=32, 128-latent step ran 27x faster on one thread than on two under load).
    """
    if cfg.threads is not None:
        return cfg.threads
    if device.type == "cpu" and macs_per_step < 2**27:
        return 1
    return _DEFAULT_THREADS if device.type == "cpu" else None


def auto_batch_size(n_train: int) -> int:
    """The default rows per step: 4096, halved (down to 16) until there are at least 8 steps per epoch."""
    b = 4096
    while b > 16 and b * 8 > n_train:
        b //= 2
    return b


def _total_rows(cfg: TrainConfig, n_train: int) -> int:
    if cfg.rows is not None:
        return cfg.rows
    if cfg.epochs is not None:
        return int(cfg.epochs * n_train)
    return min(max(20 * n_train, 2_000_000), 200 * n_train)


def _exclude_rows(stats: Scan, source, val_ids: np.ndarray) -> Scan:
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


@torch.no_grad()
def init_b_dec(model, source, train_ids: np.ndarray, seed: int, n_sample: int = 4096, iters: int = 30) -> None:
    """b_dec = geometric median of a sample of standardised rows (Weiszfeld's algorithm)."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(train_ids, size=min(n_sample, len(train_ids)), replace=False))
    x = model.standardizer(torch.from_numpy(source.take(ids)).to(model.W_dec.device))
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(1e-6)
        m = (w[:, None] * x).sum(0) / w.sum()
    model.b_dec.copy_(m)


def _version() -> str:
    from flashsae import __version__

    return __version__
