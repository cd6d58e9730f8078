"""Many SAEs trained on one data pass.

`train_many` opens, scans and standardises the data once, reads one stream of shuffled batches,
moves each batch to the device and standardises it once, then hands the same tensor to every
model's `Trainer.step`. Each model keeps its own optimizer, schedules, dead-latent counters, log,
held-out evaluations, early stopping and run directory, written exactly as `train()` writes them:
with the same options and seed, a model trained here is bit-identical on CPU to one trained alone.

Configs that read the data differently cannot share a pass. They are grouped, in order of first
appearance, by the options in `PASS_OPTIONS` (every data option plus seed, batch_size and device)
and each group gets its own pass. Everything else may differ inside a pass, including `rows`/`epochs`
and `patience`: a model that is done leaves the pass (it is evaluated and written at once) and the
pass goes on while any model is still training. On the CPU, when a pass holds several models whose
steps are small (`SIDE_BY_SIDE_MACS`), each steps on one thread and several step at the same time
(`workers`), which is where most of the CPU speedup comes from: sharing the data saves little next
to the steps themselves; such a model equals `train(..., threads=1)`. Otherwise each model steps
with the thread count `train()` would pick for it alone.

Imports train.run (its setup pieces, log rows and artifact writers), train.trainer, data, io and
eval; never cli.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from flashsae import distributed, io
from flashsae.config import DataConfig, TrainConfig, to_dict
from flashsae.data import BatchIterator, open_source
from flashsae.data.device import to_device
from flashsae.data.stream import STREAM_FIELDS
from flashsae.errors import ConfigError
from flashsae.train import checkpoint, loggers
from flashsae.train.options import make_model_config, split_options
from flashsae.train.run import (
    Interrupted,
    PreparedRows,
    TrainResult,
    _cpu_threads,
    _final_metrics,
    _install_signal_handlers,
    _log_step,
    _prepare_rows,
    _restore_signal_handlers,
    _run_config,
    _schedule,
    _summary,
    _write_log,
    _write_run,
    init_b_dec,
    resolve_device,
)
from flashsae.train.trainer import Trainer

PASS_OPTIONS = ("seed", "batch_size", "device")
"""Training options that shape the data pass (split, shuffle, batch, device); every data option does too."""


def train_many(data, configs: list[dict], *, outs: list | None = None, overwrite: bool = False,
               quiet: bool = False, progress: bool | None = None, tensorboard: bool = False,
               wandb: bool = False, workers: int | None = None) -> list[tuple]:
    """Train one sparse autoencoder per config, sharing the data pass between them.

    Args:
        data: what `train()` accepts (array, path, built-in name, or None for 'digits'), shared by every config.
        configs: one dict of `train()` options per model.
        outs: one run directory per config (as `train(out=...)`), or None to keep the models in memory.
        overwrite: replace existing run directories.
        quiet: no progress bar or summaries.
        progress: show the progress bar (default: not quiet).
        tensorboard: also write TensorBoard event files to each `<out>/tensorboard`.
        wandb: also log to Weights & Biases; one model per pass only (a process holds one W&B run).
        workers: on the CPU, step up to this many models at the same time, each on its own thread,
            when every model runs on one thread (threads=1, or steps below SIDE_BY_SIDE_MACS).
            None: one per core, or one model at a time when `threads` is set; 1 also keeps each
            model on the thread count train() would pick alone.

    Returns:
        (model, TrainResult) per config, in the order of `configs`. A model's `train_seconds` is
        its share of the pass's training time: its own steps (in proportion to their duration when
        models step at once) plus an equal share of the batch reading and standardisation, so the
        models of one pass add up to the pass's training time (evaluations excluded, as in train()).

    Raises:
        ConfigError: an invalid config, `outs` of the wrong length or with a repeated directory, an
            existing directory without `overwrite`, or options for training on the fly.
        DataError: as `train()`.
        Interrupted: a signal stopped the pass; every unfinished model left a checkpoint in its
            `<out>.partial` (continue it alone with `train(..., out=..., resume=True)`).
    """
    configs = list(configs or [])
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if not configs:
        raise ConfigError("train_many needs at least one config")
    if outs is not None and len(outs) != len(configs):
        raise ConfigError(f"got {len(outs)} output directories for {len(configs)} configs")
    if outs is not None and len({Path(o).resolve() for o in outs}) != len(outs):
        raise ConfigError("two configs write to the same output directory")
    loggers.check_options(tensorboard=tensorboard, wandb=wandb, has_out=outs is not None)
    show = (not quiet) if progress is None else progress
    members = [_Member(i, data, cfg, None if outs is None else outs[i], overwrite) for i, cfg in enumerate(configs)]
    passes: dict[tuple, list[_Member]] = {}
    for m in members:
        passes.setdefault(m.pass_key, []).append(m)
    if wandb and any(len(group) > 1 for group in passes.values()):
        raise ConfigError("W&B logs one run per process: train these models one at a time to log them to W&B")
    results: list = [None] * len(configs)
    for n, group in enumerate(passes.values()):
        if not quiet and len(passes) > 1:
            print(f"[pass {n + 1}/{len(passes)}] {len(group)} model(s)", flush=True)
        for m, res in zip(group, _train_pass(data, group, show=show, tensorboard=tensorboard, wandb=wandb,
                                                  workers=workers)):
            results[m.index] = res
    return results


class _Member:
    """One config of `train_many`, checked before any data is read."""

    def __init__(self, index: int, data, options: dict, out, overwrite: bool):
        options = dict(options)
        on_the_fly = sorted(set(options) & STREAM_FIELDS)
        if on_the_fly:
            raise ConfigError(f"training on the fly ({', '.join(on_the_fly)}) trains one model at a time; "
                              "harvest the activations to a directory first")
        if data is not None and not isinstance(data, (str, Path)):
            options.setdefault("data", "<array>")
        elif data is not None:
            options["data"] = str(data)
        self.index = index
        self.architecture, data_opts, train_opts, self.model_opts = split_options(options)
        self.data_cfg = DataConfig(**data_opts)
        self.train_cfg = TrainConfig(**train_opts)
        self.out = out
        self.overwrite = overwrite
        if out is not None:
            io.prepare_out(out, overwrite=overwrite, resume=False, create=False)
        train_dict = to_dict(self.train_cfg)
        self.pass_key = (repr(sorted(to_dict(self.data_cfg).items())), tuple(train_dict[k] for k in PASS_OPTIONS))


def _train_pass(data, members: list[_Member], *, show: bool, tensorboard: bool, wandb: bool,
                workers: int | None) -> list[tuple]:
    """Set up every model of one pass on the shared data, train them together, return (model, result)."""
    data_cfg, train_cfg = members[0].data_cfg, members[0].train_cfg
    spec = data if data is not None and not isinstance(data, (str, Path)) else data_cfg.data
    source = open_source(
        spec, key=data_cfg.key, image_shape=data_cfg.image_shape,
        synthetic=data_cfg.synthetic_params() if isinstance(spec, str) and spec == "synthetic" else None)
    model_cfgs = [make_model_config(m.architecture, m.model_opts, source.d_in) for m in members]  # fail early
    data_fp = checkpoint.fingerprint(source)
    device = resolve_device(train_cfg.device)
    rows = _prepare_rows(source, data_cfg, train_cfg, distributed.LOCAL, show)
    default_threads = torch.get_num_threads()
    standardizer = rows.standardizer.to(device)
    runs: list[_Run] = []
    b_dec: dict[int, torch.Tensor] = {}  # geometric median of the data by thread count (reductions may round apart)
    macs = [rows.batch_size * source.d_in * cfg.d_sae for cfg in model_cfgs]
    side_by_side = _side_by_side(members, macs, device, workers)
    try:
        for m, model_cfg, step_macs in zip(members, model_cfgs, macs):
            threads = 1 if side_by_side else _cpu_threads(m.train_cfg, device, step_macs)
            runs.append(_Run(m, model_cfg, source, rows, data_fp, device, b_dec=b_dec,
                             threads=threads or default_threads, tensorboard=tensorboard, wandb=wandb))
        batches = BatchIterator(source, rows.train_ids, rows.batch_size, seed=train_cfg.seed)
        _loop(runs, batches, standardizer, device, show, workers)
    finally:
        for run in runs:
            run.logs.close()
    if show:
        for run in runs:
            _summary(run.result.metrics, run.result.run_dir)
    return [(run.model, run.result) for run in runs]


class _Run:
    """One model of a pass: its trainer, loop state and log sinks, mirroring `run._train_loop`."""

    def __init__(self, member: _Member, model_cfg, source, rows: PreparedRows, data_fp: str, device, *,
                 b_dec: dict, threads: int, tensorboard: bool, wandb: bool):
        from flashsae import models

        cfg = self.cfg = member.train_cfg
        # As train() would run this model alone; the loop switches before each model's step.
        self.threads = threads
        torch.set_num_threads(threads)
        self.source, self.rows = source, rows
        torch.manual_seed(cfg.seed)  # the same initial weights as train() with this seed
        self.model = models.get(member.architecture)(model_cfg, copy.deepcopy(rows.standardizer)).to(device)
        self.total_steps, dead_after, self.eval_every = _schedule(cfg, len(rows.train_ids), rows.batch_size)
        self.trainer = Trainer(self.model, cfg, total_steps=self.total_steps, dead_after_rows=dead_after)
        self.eval_ids = rows.val_ids[:4096] if len(rows.val_ids) else rows.train_ids[:4096]
        self.run_config = _run_config(member.architecture, model_cfg, cfg, member.data_cfg, source, rows, data_fp,
                                      {"batch_size": rows.batch_size, "total_steps": self.total_steps,
                                       "lr": self.trainer.base_lr, "dtype": self.trainer.dtype,
                                       "dead_after_rows": dead_after, "device": str(device), "world_size": 1})
        if threads in b_dec:  # the geometric median depends on the data and seed only: computed once per pass
            with torch.no_grad():
                self.model.b_dec.copy_(b_dec[threads])
        else:
            init_b_dec(self.model, source, rows.train_ids, cfg.seed)
            b_dec[threads] = self.model.b_dec.detach().clone()
        self.out = member.out
        self.work = None
        if member.out is not None:
            self.work = io.prepare_out(member.out, overwrite=member.overwrite, resume=False, create=True)
            io.write_json(self.work / io.CONFIG_FILE, self.run_config)
        self.state = {"step": 0, "rows_seen": 0, "history": [], "best": math.inf, "since_best": 0, "elapsed": 0.0}
        # Live curves paced on this model's training time: wall time would redraw all S models as
        # often as one, and draw models mid-run that alone finish before the first redraw.
        self.logs = loggers.TrainingLogs.open(self.work, self.run_config, self.state["history"],
                                              total_steps=self.total_steps, tensorboard=tensorboard, wandb=wandb,
                                              clock=lambda: self.state["elapsed"])
        self.acc = None
        self.n_acc = 0
        self.last_compute_s = 0.0
        self.finished = False
        self.result: TrainResult | None = None

    def compute(self, x) -> float:
        """One training step on the shared batch `x` (safe on a worker thread); returns its seconds."""
        t = time.perf_counter()
        m = self.trainer.step(x)
        self.acc = torch.stack(m) if self.acc is None else self.acc + torch.stack(m)
        self.n_acc += 1
        self.last_compute_s = time.perf_counter() - t
        return self.last_compute_s

    def after_step(self, n_rows: int, train_s: float) -> None:
        """The loop's bookkeeping after a step (log, evaluation, checkpoint, early stopping), on the main
        thread; `train_s` is the step's time plus this model's share of the batch's preparation."""
        if torch.get_num_threads() != self.threads:  # evaluation runs as it would alone too
            torch.set_num_threads(self.threads)
        state, cfg = self.state, self.cfg
        t0 = time.perf_counter() - state["elapsed"] - train_s  # perf_counter() - t0 is this model's training time
        state["step"] += 1
        state["rows_seen"] += n_rows
        step = state["step"]
        done = step >= self.total_steps
        if step % cfg.log_every == 0 or done or step % self.eval_every == 0:
            row, t0 = _log_step(self.trainer, self.acc / self.n_acc, state, t0, self.source, self.eval_ids,
                                evaluate_now=step % self.eval_every == 0 or done)
            self.acc, self.n_acc = None, 0
            self.logs.log(row)
            if self.work is not None:
                _write_log(self.work / io.LOG_FILE, state["history"])
        state["elapsed"] = time.perf_counter() - t0
        if self.work is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not done:
            checkpoint.save(self.work, self.model, self.trainer, state)
        if cfg.patience and state["since_best"] >= cfg.patience:
            self.total_steps = step  # early stop
        self.finished = step >= self.total_steps

    def finish(self) -> None:
        """Final held-out evaluation and the run directory, as `train()` writes them."""
        rows, state = self.rows, self.state
        torch.set_num_threads(self.threads)
        metrics = _final_metrics(self.model, self.source, rows, state, False)  # the pass has one progress bar
        self.logs.summary(metrics, state["step"])
        self.logs.close()
        self.result = TrainResult(metrics, state["elapsed"], state["rows_seen"], state["step"], None,
                                  state["history"])
        if self.work is not None:
            self.result.run_dir = _write_run(self.work, self.out, self.model, self.run_config, metrics,
                                             state["history"], self.source,
                                             rows.val_ids if len(rows.val_ids) else rows.train_ids)


def _compute(active: list[_Run], x, pool: ThreadPoolExecutor | None, n_workers: int) -> list[float]:
    """Step every active model on `x`; return each one's share of the time this took.

    With a pool (CPU, one thread per model) the models are spread over its workers, longest last
    step first onto the least loaded worker; each model's kernels still run on one thread, so its
    numbers are those of the model trained alone. The wall time is shared in proportion to the
    models' own step times.
    """
    if pool is None:
        out = []
        for run in active:
            if torch.get_num_threads() != run.threads:
                torch.set_num_threads(run.threads)
            out.append(run.compute(x))
        return out
    n_workers = min(n_workers, len(active))
    groups: list[list[_Run]] = [[] for _ in range(n_workers)]
    load = [0.0] * n_workers
    for run in sorted(active, key=lambda r: -r.last_compute_s):
        i = load.index(min(load))
        groups[i].append(run)
        load[i] += run.last_compute_s or 1.0
    t = time.perf_counter()
    futures = [pool.submit(lambda g: [r.compute(x) for r in g], g) for g in groups]
    try:
        for future in futures:
            future.result()
    finally:
        wait(futures)  # no model is still changing when an interrupt writes the checkpoints
    wall = time.perf_counter() - t
    total = sum(r.last_compute_s for r in active) or 1.0
    return [wall * r.last_compute_s / total for r in active]


SIDE_BY_SIDE_MACS = 2**29
"""On the CPU, models whose step is below this many multiply-adds (batch x d_in x latents) step on one
thread each, side by side, when a pass has several: at d=64, 512 latents, batch 4096 a step takes
18.8 ms on one thread and 16.3 ms on two, so two models side by side do twice the work in the time."""


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _side_by_side(members: list[_Member], macs: list[int], device, workers: int | None) -> bool:
    """Whether every model of a pass steps on one thread, several at a time (see SIDE_BY_SIDE_MACS).

    Not when a config sets `threads`, `workers` is 1, the pass has one model or the machine one
    core. Such a model is bit-identical to `train(..., threads=1)` (train() alone picks one thread
    itself below 2**27 multiply-adds).
    """
    return (device.type == "cpu" and len(members) > 1 and _cores() > 1 and workers != 1
            and all(m.train_cfg.threads is None for m in members) and max(macs) < SIDE_BY_SIDE_MACS)


def _workers(runs: list[_Run], device, requested: int | None) -> int:
    """Threads that step models at the same time (1: one after another).

    Only on the CPU when every model steps on one thread. A small step gains little from a second
    thread (OpenMP wake-ups cost more than the work, see `run._cpu_threads`), so the other cores are
    better spent on other models: by default one worker per core. An explicit `threads` is a limit
    the default respects; `requested` overrides it.
    """
    cores = _cores()
    if device.type != "cpu" or any(r.threads != 1 for r in runs):
        return 1
    if requested is None:
        requested = 1 if any(r.cfg.threads is not None for r in runs) else cores
    return max(1, min(requested, cores, len(runs)))


def _loop(runs: list[_Run], batches: BatchIterator, standardizer, device, show: bool,
          workers: int | None) -> None:
    """Read each batch once and step every unfinished model on it until all are done."""
    per_epoch = batches.batches_per_epoch()
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=max(r.total_steps for r in runs), desc=f"train {len(runs)} models", unit="step",
                   dynamic_ncols=True)
    stop = {"signal": None}
    old_handlers = _install_signal_handlers(stop)
    n_workers = _workers(runs, device, workers)
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="flashsae-models", initializer=torch.set_num_threads,
                              initargs=(1,)) if n_workers > 1 else None
    step = 0
    try:
        while not all(r.finished for r in runs):
            epoch, start = divmod(step, per_epoch)
            t_mark = time.perf_counter()
            for raw in to_device(batches.epoch(epoch, start_batch=start), device):
                x = standardizer(raw)
                active = [r for r in runs if not r.finished]
                shared_s = (time.perf_counter() - t_mark) / len(active)
                for run, train_s in zip(active, _compute(active, x, pool, n_workers)):
                    run.after_step(raw.shape[0], train_s + shared_s)
                step += 1
                for run in active:
                    if run.finished:
                        run.finish()
                if bar is not None:
                    bar.update(1)
                if stop["signal"] is not None:
                    raise Interrupted(stop["signal"])  # caught below
                if all(r.finished for r in runs):
                    break
                t_mark = time.perf_counter()
    except (Interrupted, KeyboardInterrupt):
        for run in runs:
            if not run.finished and run.work is not None:
                checkpoint.save(run.work, run.model, run.trainer, run.state)
        name = stop["signal"]
        signum = getattr(signal, name, None) if isinstance(name, str) and name.startswith("SIG") else None
        saved = "; each unfinished model left a checkpoint, continue one with flashsae train --resume --out DIR" \
            if any(r.work is not None and not r.finished for r in runs) else ""
        raise Interrupted(f"training interrupted by {name or 'an interrupt'} at step {step}{saved}", signum) from None
    finally:
        if pool is not None:
            pool.shutdown()
        _restore_signal_handlers(old_handlers)
        if bar is not None:
            bar.close()
