"""`TrainingRun`: one model's training, driven step by step by the loop.

A run owns its model, `Trainer` (optimizer, schedules, dead-latent counters), loop state, log
sinks, held-out evaluations, early stopping, checkpoints and, when it is done, its result and run
directory. It does no setup of its own: the data side comes from a `DataPass` and the options
from a `RunSpec`. `train()`, `train_many()` and the scikit-learn estimator all drive runs through
`loop.run_pass`; the estimator's `partial_fit` extends a run by a number of steps.

Imports io, models, eval, and the train modules below it; never the loop or cli.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashsae import io
from flashsae.errors import ConfigError
from flashsae.eval.evaluate import evaluate
from flashsae.models.sharded import check as check_sharding
from flashsae.models.sharded import shard
from flashsae.train import artifacts, checkpoint, loggers
from flashsae.train.checkpoint import LoopState
from flashsae.train.prepare import DataPass
from flashsae.train.spec import RunSpec
from flashsae.train.trainer import Trainer


@dataclass
class TrainResult:
    metrics: dict                 # held-out metrics of the final model
    train_seconds: float          # training time of the run (steps only, no setup or evaluations)
    rows_seen: int
    steps: int
    run_dir: Path | None
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)  # what the user should know: early stop, codes not sparse, ...

    @property
    def rows_per_s(self) -> float:
        return self.rows_seen / max(self.train_seconds, 1e-9)


ROWS_PER_LATENT = 2000
"""The default budget gives a dictionary at least this many training rows per latent: a 3,072-latent
SAE on 50k embeddings still improved at 40 epochs (held-out FVU 0.34) and reached 0.14 at 120."""


def default_rows(n_train: int, d_sae: int) -> int:
    """Rows a run trains on by default: max(20 epochs, 2M rows, ROWS_PER_LATENT per latent), at most 200 epochs."""
    return min(max(20 * n_train, 2_000_000, ROWS_PER_LATENT * d_sae), 200 * n_train)


def schedule(spec: RunSpec, n_train: int, batch_size: int, d_sae: int) -> tuple[int, int, int]:
    """(total_steps, dead_after_rows, eval_every) of a run."""
    cfg = spec.train
    if cfg.rows is not None:
        rows = cfg.rows
    elif cfg.epochs is not None:
        rows = int(cfg.epochs * n_train)
    else:
        rows = default_rows(n_train, d_sae)
    total_steps = max(1, rows // batch_size)
    dead_after = cfg.dead_after_rows or max(batch_size, min(10_000_000, total_steps * batch_size // 10))
    eval_every = max(1, total_steps // 10) if cfg.eval_every is None else (cfg.eval_every or total_steps)
    return total_steps, dead_after, eval_every


STILL_FALLING = 0.01
"""A held-out FVU that fell by more than this fraction over the last evaluation interval has not flattened."""


class TrainingRun:
    """One model trained on a pass's batches.

    Args:
        spec: the run's options.
        dpass: the shared data side.
        threads: CPU threads this run's steps and evaluations use.
        out: the run directory to write (None keeps the model in memory).
        overwrite: replace an existing `out`.
        resume: continue from the checkpoint in `<out>.partial` (its config.json must match `spec`).
        tensorboard, wandb: extra log sinks.
    """

    def __init__(self, spec: RunSpec, dpass: DataPass, *, threads: int, out=None, overwrite: bool = False,
                 resume: bool = False, tensorboard: bool = False, wandb: bool = False):
        from flashsae import kernels, models

        self.spec, self.dpass, self.threads = spec, dpass, threads
        comm = dpass.comm
        cfg = spec.train
        torch.set_num_threads(threads)
        model_cfg = dpass.model_config(spec)
        torch.manual_seed(cfg.seed)
        cls = models.get(spec.architecture)
        if cfg.tensor_parallel != comm.tensor.size:
            raise ConfigError(f"tensor_parallel {cfg.tensor_parallel} needs its own process groups: train one model "
                              "with flashsae train under torchrun")
        check_sharding(cls, model_cfg, comm.tensor.size)
        model = cls(model_cfg, copy.deepcopy(dpass.standardizers[cls.inputs[0]]))
        if model.target_standardizer is not None:
            model.target_standardizer = copy.deepcopy(dpass.standardizers[cls.targets[0]])
        if not resume:
            dpass.init_b_dec(model, threads)
        comm.broadcast_module_(model)  # every rank starts from rank 0's weights and standardiser
        # This rank's latents when they are split over ranks, moved to the device only once sliced.
        self.model = shard(model, comm.tensor).to(dpass.device)
        self.total_steps, dead_after, self.eval_every = schedule(spec, len(dpass.train_ids), dpass.batch_size,
                                                                 model_cfg.d_sae)
        self.trainer = Trainer(self.model, cfg, total_steps=self.total_steps, dead_after_rows=dead_after, comm=comm)
        resolved = {"batch_size": dpass.batch_size, "total_steps": self.total_steps, "lr": self.trainer.base_lr,
                    "dtype": self.trainer.dtype, "dead_after_rows": dead_after, "device": str(dpass.device),
                    "world_size": comm.world_size * comm.tensor.size, "threads": threads,
                    "rows_on_device": dpass.rows_go_to_device(),
                    **kernels.describe(dpass.device)}
        self.config = io.run_config(spec.architecture, model_cfg, train=cfg, data=spec.data,
                                    preprocess={"mode": dpass.standardizers[cls.inputs[0]].mode},
                                    data_stats=dpass.data_stats(), resolved=resolved)
        self.out = out
        self.work = None
        if out is not None and comm.is_main():  # only rank 0 writes, but for the shards of a checkpoint
            self.work = io.prepare_out(out, overwrite=overwrite, resume=resume, create=not resume)
        self._ckpt = io.partial_dir(Path(out)) if out is not None and comm.tensor.size > 1 else self.work
        if resume:
            self.state = checkpoint.load(io.partial_dir(Path(out)), self.model, self.trainer)
        else:
            self.state = LoopState()
            if self.work is not None:
                io.write_json(self.work / io.CONFIG_FILE, self.config)
        # Live curves paced on this run's training time: wall time would redraw all the models of a
        # pass as often as one, and draw models mid-run that alone finish before the first redraw.
        self.logs = loggers.TrainingLogs.open(self.work, self.config, self.state.history,
                                              total_steps=self.total_steps,
                                              resume_step=self.state.step + 1 if resume else None,
                                              tensorboard=tensorboard and comm.is_main(),
                                              wandb=wandb and comm.is_main(), clock=lambda: self.state.elapsed)
        self._acc = None
        self._n_acc = 0
        self.last_step_s = 0.0
        self.stopped_early: tuple[int, int] | None = None  # (step, planned steps)
        self.result: TrainResult | None = None

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps

    def extend(self, n_steps: int) -> None:
        """Train `n_steps` more steps at the next pass (the estimator's partial_fit)."""
        self.total_steps = self.state.step + n_steps
        self.eval_every = self.total_steps

    def step(self, batch: dict) -> float:
        """One optimizer step on the pass's batch (safe on a worker thread); returns its seconds."""
        t = time.perf_counter()
        m = torch.stack(self.trainer.step(batch))
        self._acc = m if self._acc is None else self._acc + m
        self._n_acc += 1
        self.last_step_s = time.perf_counter() - t
        return self.last_step_s

    def after_step(self, n_rows: int) -> tuple[bool, float]:
        """Bookkeeping after a step (log, held-out evaluation, checkpoint, early stopping), on the main
        thread. Returns (whether this was a log step, the seconds spent evaluating)."""
        if torch.get_num_threads() != self.threads:  # evaluation runs as it would alone too
            torch.set_num_threads(self.threads)
        state, cfg = self.state, self.spec.train
        state.step += 1
        state.rows_seen += n_rows
        step = state.step
        done = step >= self.total_steps
        evaluate_now = step % self.eval_every == 0 or done
        at_log = step % cfg.log_every == 0 or evaluate_now
        eval_s = 0.0
        if at_log:
            eval_s = self._log(evaluate_now)
        if self._ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not done:
            self.checkpoint()
        if cfg.patience and state.since_best >= cfg.patience and not done:
            self.stopped_early = (step, self.total_steps)
            self.total_steps = step
        return at_log, eval_s

    def _log(self, evaluate_now: bool) -> float:
        """A log row from the step metrics averaged since the last one (over ranks too), the AuxK switch,
        and at evaluation steps the held-out check. Returns the seconds the evaluation took."""
        state, trainer, comm = self.state, self.trainer, self.dpass.comm
        acc, shards = self._acc / self._n_acc, comm.tensor
        # L0 and the dead fraction count this rank's latents: summed over the shards (of equal size)
        per_shard = shards.sum_(torch.stack([acc[3], trainer.dead_mask().float().mean()]))
        acc[3] = per_shard[0]
        loss, mse, var, l0, aux = comm.all_reduce_mean_(acc).tolist()  # one device read
        self._acc, self._n_acc = None, 0
        row = {"step": state.step, "rows_seen": state.rows_seen, "loss": loss, "mse": mse,
               "fvu_standardized": mse / max(var, 1e-12), "l0": l0, "aux_loss": aux,
               "dead_fraction_window": float(per_shard[1]) / shards.size,
               "lr": trainer.optimizer.param_groups[0]["lr"], "val_fvu_standardized": "", "val_l0": "",
               "elapsed_s": round(state.elapsed, 3)}
        trainer.refresh_aux()
        eval_s = 0.0
        if evaluate_now:
            t = time.perf_counter()
            v = evaluate(self.model, self.dpass.source, self.dpass.eval_ids(), targets=self.dpass.target_of(self.model))
            self.model.train()
            eval_s = time.perf_counter() - t
            # Every rank evaluates the same rows; rank 0's numbers make the early-stopping call.
            val = torch.tensor([v["fvu_standardized"], v["l0"]], dtype=torch.float64)
            val[1:] = comm.tensor.sum_(val[1:].clone())  # a shard's L0 counts its own latents
            fvu, l0 = comm.broadcast_(val).tolist()
            row["val_fvu_standardized"], row["val_l0"] = fvu, l0
            if fvu < state.best * (1 - 1e-3):
                state.best, state.since_best = fvu, 0
            else:
                state.since_best += 1
        state.history.append(row)
        self.logs.log(row)
        if self.work is not None:
            artifacts.write_log(self.work / io.LOG_FILE, state.history)
        return eval_s

    def checkpoint(self) -> None:
        """Write a checkpoint for --resume (rank 0 with an output directory; every rank when sharded)."""
        if self._ckpt is not None:
            checkpoint.save(self._ckpt, self.model, self.trainer, self.state, self.dpass.comm)

    def interrupted(self) -> TrainResult:
        """The result of a run stopped before its end (its checkpoint is written)."""
        self.logs.close()
        s = self.state
        self.result = TrainResult({}, s.elapsed, s.rows_seen, s.step, self.work, s.history, interrupted=True)
        return self.result

    def finish(self, *, evaluate_final: bool = True, progress: bool = False) -> TrainResult:
        """Final held-out evaluation and the run directory; returns (and keeps) the result."""
        s, dpass = self.state, self.dpass
        torch.set_num_threads(self.threads)
        if self.dpass.comm.tensor.size > 1:  # the whole model on every rank, for evaluation and writing
            self.model = self.model.gather()
        self.model.eval()
        metrics: dict = {}
        if evaluate_final:
            metrics = dict(evaluate(self.model, dpass.source, dpass.final_ids(), targets=dpass.target_of(self.model),
                                    progress=progress))
            metrics.update(rows_seen=s.rows_seen, steps=s.step, train_seconds=round(s.elapsed, 3),
                           rows_per_s=round(s.rows_seen / max(s.elapsed, 1e-9), 1),
                           evaluated_on="held-out" if len(dpass.val_ids) else "training rows")
            if self.stopped_early is not None:
                metrics["stopped_early_at_step"] = self.stopped_early[0]
            self.logs.summary(metrics, s.step)
        self.logs.close()
        self.result = TrainResult(metrics, s.elapsed, s.rows_seen, s.step, None, s.history,
                                  notes=self._notes(metrics) if evaluate_final else [])
        if self.work is not None:
            self.result.run_dir = artifacts.write_run(self.work, self.out, self.model, self.config, metrics,
                                                      s.history, dpass.source, dpass.final_ids())
        return self.result

    def _notes(self, metrics: dict) -> list[str]:
        """What a person should hear about the finished run, beyond its numbers."""
        notes = []
        if self.stopped_early is not None:
            step, planned = self.stopped_early
            notes.append(f"stopped early at step {step} of {planned}: the held-out FVU did not improve in "
                         f"{self.spec.train.patience} evaluations (--patience)")
        val = [(r["step"], r["val_fvu_standardized"]) for r in self.state.history
               if r.get("val_fvu_standardized") not in ("", None)]
        if self.stopped_early is None and len(val) >= 3:
            (_, before), (_, last) = val[-2], val[-1]
            if last < before * (1 - STILL_FALLING):
                notes.append(f"the held-out FVU was still falling at the end ({before:.4g} -> {last:.4g} over the "
                             "last evaluation interval): the curve has not flattened; train longer (--epochs or "
                             "--rows)")
        l0, dense, d_in = metrics.get("l0", 0.0), metrics.get("dense_fraction", 0.0), self.model.d_in
        if l0 > d_in / 2 or dense > 0.5:
            notes.append(f"the codes are not sparse: L0 {l0:.1f} on {d_in} columns, {100 * dense:.0f}% of latents "
                         "fire on more than 10% of rows; raise the sparsity penalty (--l1, --l0, --beta) or "
                         "lower --k")
        return notes

    def close(self) -> None:
        self.logs.close()
