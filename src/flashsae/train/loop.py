"""`run_pass`: the only training loop. One pass over the batches steps every unfinished run.

`train()` drives one run through it, `train_many()` several, the estimator's `partial_fit` one
run extended by a number of steps. Each batch is read, moved to the device and standardised once
(by the pass's BatchSource) and handed to every run that is at that step; runs that are done
leave the pass (evaluated and written at once) and the pass goes on while any is training. A run
resumed at a later step than the others waits until the pass reaches it, so a resumed pass feeds
every run exactly the batches it would have had.

On the CPU, runs that each step on one thread can step side by side on a small pool (`workers`):
each run's kernels still run on one thread, so its numbers are those of the run alone.

SIGINT and SIGTERM stop the pass at the next step: every unfinished run writes a checkpoint and
`Interrupted` (exit status 128 + signal) says how to continue. Under torchrun the ranks agree on
stopping at log steps, their one sync point. Imports training_run and distributed; never cli.
"""
from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from flashsae import distributed
from flashsae.errors import Interrupted
from flashsae.train.prepare import cores
from flashsae.train.training_run import TrainingRun

STOP_AFTER = "stop_after_steps"


def run_pass(runs: list[TrainingRun], batches, *, comm: distributed.Comm = distributed.LOCAL, show: bool = False,
             workers: int | None = None, stop_after_steps: int | None = None, resume_hint: str = "") -> bool:
    """Step every run on `batches` until all are finished; return True when stopped by `stop_after_steps`.

    Args:
        runs: the runs of this pass (finished runs are skipped).
        batches: the pass's BatchSource (`batches_per_epoch()`, `epoch(epoch, start_batch)`).
        comm: the process group (data parallel); every rank runs the same pass.
        show: one progress bar for the pass.
        workers: on the CPU, runs stepped at the same time when every run steps on one thread
            (None: one per core; 1: one after another).
        stop_after_steps: stop as if interrupted after this many pass steps, leaving checkpoints.
        resume_hint: how to continue, appended to the interruption message.

    Raises:
        Interrupted: a signal stopped the pass; every unfinished run wrote a checkpoint.
    """
    pending = [r for r in runs if not r.finished]
    if not pending:
        return False
    step = min(r.state.step for r in pending)
    per_epoch = batches.batches_per_epoch()
    bar = None
    if show:
        from tqdm.auto import tqdm

        desc = "train" if len(runs) == 1 else f"train {len(runs)} models"
        bar = tqdm(total=max(r.total_steps for r in runs), initial=step, desc=desc, unit="step", dynamic_ncols=True)
    stop: dict = {"signal": None}
    old_handlers = _install_signal_handlers(stop)
    n_workers = _workers(pending, workers)
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="flashsae-models", initializer=torch.set_num_threads,
                              initargs=(1,)) if n_workers > 1 else None
    try:
        while any(not r.finished for r in runs):
            epoch, start = divmod(step, per_epoch)
            t_mark = time.perf_counter()
            for batch in batches.epoch(epoch, start_batch=start):
                active = [r for r in runs if not r.finished and r.state.step == step]
                step_s = _step_all(active, batch, pool, n_workers)
                t_stepped = time.perf_counter()
                n_rows = next(iter(batch.values())).shape[0] * comm.world_size
                sync, eval_s = False, 0.0
                # Training time: reading the batch and the steps, then the log steps' device reads and
                # checkpoints; evaluations are not counted. Shared in proportion to the runs' steps.
                for run, share in zip(active, _shares(step_s, t_stepped - t_mark)):
                    run.state.elapsed += share
                    at_log, s = run.after_step(n_rows)
                    sync, eval_s = sync or at_log, eval_s + s
                for run, share in zip(active, _shares(step_s, time.perf_counter() - t_stepped - eval_s)):
                    run.state.elapsed += share
                step += 1
                for run in active:
                    if run.finished:
                        run.finish(progress=show and len(runs) == 1)
                if bar is not None:
                    bar.update(1)
                    _postfix(bar, active)
                if stop_after_steps is not None and step >= stop_after_steps and any(not r.finished for r in runs):
                    stop["signal"] = STOP_AFTER
                if stop["signal"] == STOP_AFTER or comm.agree_stop(stop["signal"] is not None, sync_point=sync):
                    stop["signal"] = stop["signal"] or "a signal to another rank"
                    raise Interrupted(stop["signal"])  # caught below
                if all(r.finished for r in runs):
                    break
                t_mark = time.perf_counter()
    except (Interrupted, KeyboardInterrupt):
        for run in runs:
            if not run.finished:
                run.checkpoint()
                run.interrupted()
        if stop["signal"] == STOP_AFTER:
            return True
        name = stop["signal"] or "an interrupt"
        signum = getattr(signal, name, None) if name.startswith("SIG") else signal.SIGINT
        raise Interrupted(f"training interrupted by {name} at step {step}{resume_hint}", int(signum)) from None
    finally:
        if pool is not None:
            pool.shutdown()
        _restore_signal_handlers(old_handlers)
        if bar is not None:
            bar.close()
    return False


def _shares(step_s: list[float], wall: float) -> list[float]:
    """Split `wall` seconds between the runs in proportion to their own step times."""
    total = sum(step_s) or 1.0
    return [max(wall, 0.0) * s / total for s in step_s]


def _postfix(bar, active: list[TrainingRun]) -> None:
    if len(active) == 1 and active[0].state.history:
        row = active[0].state.history[-1]
        bar.set_postfix(fvu_std=f"{row['fvu_standardized']:.3f}", l0=f"{row['l0']:.1f}", refresh=False)


def _step_all(active: list[TrainingRun], batch: dict, pool: ThreadPoolExecutor | None, n_workers: int) -> list[float]:
    """Step every active run on `batch`; return each one's step seconds.

    With a pool the runs are spread over its workers, longest last step first onto the least
    loaded worker.
    """
    if pool is None:
        out = []
        for run in active:
            if torch.get_num_threads() != run.threads:
                torch.set_num_threads(run.threads)
            out.append(run.step(batch))
        return out
    n = min(n_workers, len(active))
    groups: list[list[TrainingRun]] = [[] for _ in range(n)]
    load = [0.0] * n
    for run in sorted(active, key=lambda r: -r.last_step_s):
        i = load.index(min(load))
        groups[i].append(run)
        load[i] += run.last_step_s or 1.0
    futures = [pool.submit(lambda g: [r.step(batch) for r in g], g) for g in groups]
    try:
        for future in futures:
            future.result()
    finally:
        wait(futures)  # no run is still changing when an interrupt writes the checkpoints
    return [r.last_step_s for r in active]


def _workers(runs: list[TrainingRun], requested: int | None) -> int:
    """Threads that step runs at the same time (1: one after another).

    Only on the CPU when every run steps on one thread. A small step gains little from a second
    thread (OpenMP wake-ups cost more than the work, see `prepare.cpu_threads`), so the other cores
    are better spent on other runs: by default one worker per core. An explicit `threads` is a
    limit the default respects; `requested` overrides it.
    """
    if len(runs) < 2 or runs[0].dpass.device.type != "cpu" or any(r.threads != 1 for r in runs):
        return 1
    if requested is None:
        requested = 1 if any(r.spec.train.threads is not None for r in runs) else cores()
    return max(1, min(requested, cores(), len(runs)))


def _install_signal_handlers(stop: dict) -> dict:
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
