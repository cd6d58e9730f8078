"""`train()` and `train_many()`: the Python API's entry points, both thin drivers of one engine.

Each turns options into `RunSpec`s, opens a `DataPass`, builds one `TrainingRun` per model and
hands them to `loop.run_pass`; the CLI and the scikit-learn estimator call these (or the same
pieces). With the same options and seed, a model trained by `train_many` beside others is
bit-identical on CPU to one trained alone. Imports the train modules, io and distributed.
"""
from __future__ import annotations

from pathlib import Path

from flashsae import distributed, io
from flashsae.errors import ConfigError
from flashsae.train import checkpoint, loggers
from flashsae.train.artifacts import print_summary
from flashsae.train.loop import run_pass
from flashsae.train.prepare import DataPass, plan_threads
from flashsae.train.spec import RunSpec
from flashsae.train.training_run import TrainingRun, TrainResult

RESUME_HINT = "; a checkpoint was written, continue with --resume"


def train(data=None, *, out=None, overwrite: bool = False, resume: bool = False, quiet: bool = False,
          progress: bool | None = None, tensorboard: bool = False, wandb: bool = False,
          dist_timeout: float = distributed.DEFAULT_TIMEOUT_S, comm: distributed.Comm | None = None,
          stop_after_steps: int | None = None, **options):
    """Train a sparse autoencoder.

    Args:
        data: array-like (rows, features), a path (.npy, .npz, .csv, .tsv, .safetensors, shard
            directory), a built-in name ('digits', 'synthetic'), or a dict of named streams
            ({"x": ..., "y": ...}) for a model that reads one and reconstructs another; None
            means 'digits' (or the model read on the fly with `model`, `hook`, `text`).
        out: run directory to write (model, config, metrics, log, plots); None keeps it in memory.
        overwrite: replace an existing `out`.
        resume: continue from the checkpoint left in `<out>.partial`; options given must equal the
            saved ones (except `threads` and `checkpoint_every`, which apply from here on).
        quiet: no progress bar, summary or notes.
        progress: show the progress bars (default: not quiet).
        tensorboard: also write TensorBoard event files to `<out>/tensorboard` (needs tensorboard).
        wandb: also log to a Weights & Biases run (needs wandb; WANDB_MODE=offline works offline).
        dist_timeout: under torchrun, seconds a rank waits for the others before failing.
        comm: the process group to train in; None joins torchrun's (data parallel) when WORLD_SIZE > 1,
            `flashsae.distributed.LOCAL` trains alone (each rank of a sweep).
        stop_after_steps: stop as if interrupted after this many steps, leaving a checkpoint for
            `resume` (for testing crash recovery and for splitting a job).
        **options: fields of DataConfig, TrainConfig, the architecture's model config
            (`architecture`/`arch`, `d_sae`/`latents`, `k`, `l1`, ...) and, to train on a model's
            activations read on the fly, the stream's (`model`, `hook`, `text`, ...).

    Returns:
        (model, TrainResult)

    Raises:
        ConfigError, DataError: bad options or data, before anything is written.
        Interrupted: SIGINT/SIGTERM; a checkpoint was written when `out` is set.
    """
    comm = comm if comm is not None else distributed.from_env(dist_timeout)
    show = ((not quiet) if progress is None else progress) and comm.is_main()
    verbose = not quiet and comm.is_main()
    if out is None and resume:
        raise ConfigError("resume needs an output directory")
    loggers.check_options(tensorboard=tensorboard, wandb=wandb, has_out=out is not None)
    saved = None
    if out is not None:  # checked now; created once the data and options have been checked
        work = io.prepare_out(out, overwrite=overwrite, resume=resume, create=False)
        saved = io.read_json(work / io.CONFIG_FILE) if resume else None
    spec = RunSpec.for_resume(data, saved, options) if saved else RunSpec.from_options(data, options)
    if comm.tensor.size != spec.train.tensor_parallel:  # data x tensor parallel over torchrun's ranks
        comm = distributed.split(comm, spec.train.tensor_parallel)
    dpass = DataPass.open(data, spec, comm=comm, resume=resume, show=show)
    run = None
    try:
        if saved is not None:
            checkpoint.check_same_data(saved, dpass.source, dpass.fingerprint, work)
        run = TrainingRun(spec, dpass, threads=plan_threads([spec], dpass, None)[0], out=out, overwrite=overwrite,
                          resume=resume, tensorboard=tensorboard, wandb=wandb)
        run_pass([run], dpass.batches(), comm=comm, show=show, stop_after_steps=stop_after_steps,
                 resume_hint=RESUME_HINT if out is not None else "")
    finally:
        if run is not None:
            run.close()
        dpass.close()
    if verbose and not run.result.interrupted:
        print_summary(run.result)
    return run.model, run.result


def train_many(data, configs: list[dict], *, outs: list | None = None, overwrite: bool = False,
               resume: bool = False, quiet: bool = False, progress: bool | None = None, tensorboard: bool = False,
               wandb: bool = False, workers: int | None = None) -> list[tuple]:
    """Train one sparse autoencoder per config, sharing the data pass between them.

    Configs that read the data differently cannot share a pass: they are grouped, in order of first
    appearance, by their data options and `PASS_OPTIONS` (seed, batch_size, device), one pass per
    group. Everything else may differ inside a pass, including `rows`/`epochs` and `patience`.

    Args:
        data: what `train()` accepts (array, path, built-in name, or None for 'digits'), shared by every config.
        configs: one dict of `train()` options per model.
        outs: one run directory per config (as `train(out=...)`), or None to keep the models in memory.
        overwrite: replace existing run directories.
        resume: continue every model whose `<out>.partial` holds a checkpoint, keep (and load) every
            finished one, start the others.
        quiet: no progress bar, summaries or notes.
        progress: show the progress bar (default: not quiet).
        tensorboard: also write TensorBoard event files to each `<out>/tensorboard`.
        wandb: also log to Weights & Biases; one model per pass only (a process holds one W&B run).
        workers: on the CPU, step up to this many models at the same time, each on its own thread,
            when every model runs on one thread (threads=1, or steps below SIDE_BY_SIDE_MACS).
            None: one per core, or one model at a time when `threads` is set; 1 also keeps each
            model on the thread count train() would pick alone.

    Returns:
        (model, TrainResult) per config, in the order of `configs`. A model's `train_seconds` is its
        share of the pass's training time (in proportion to its steps' durations), so the models of
        one pass add up to the pass's training time (evaluations excluded, as in train()).

    Raises:
        ConfigError: an invalid config, `outs` of the wrong length or with a repeated directory, an
            existing directory without `overwrite`, or options for training on the fly.
        DataError: as `train()`.
        Interrupted: a signal stopped the pass; every unfinished model left a checkpoint in its
            `<out>.partial` (continue with `resume=True`, or one alone with `train(..., resume=True)`).
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
    if resume and outs is None:
        raise ConfigError("resume needs output directories")
    loggers.check_options(tensorboard=tensorboard, wandb=wandb, has_out=outs is not None)
    show = (not quiet) if progress is None else progress
    members = [_Member.check(data, cfg, None if outs is None else outs[i], overwrite, resume)
               for i, cfg in enumerate(configs)]
    passes: dict[tuple, list[int]] = {}
    for i, m in enumerate(members):
        if m.done is None:
            passes.setdefault(m.spec.pass_key(), []).append(i)
    if wandb and any(len(group) > 1 for group in passes.values()):
        raise ConfigError("W&B logs one run per process: train these models one at a time to log them to W&B")
    results: list = [m.done for m in members]
    for n, group in enumerate(passes.values()):
        if not quiet and len(passes) > 1:
            print(f"[pass {n + 1}/{len(passes)}] {len(group)} model(s)", flush=True)
        trained = _train_pass(data, [members[i] for i in group], show=show, verbose=not quiet, overwrite=overwrite,
                              tensorboard=tensorboard, wandb=wandb, workers=workers)
        for i, res in zip(group, trained):
            results[i] = res
    return results


class _Member:
    """One config of `train_many`, checked before any data is read."""

    def __init__(self, spec: RunSpec, out, resume: bool, saved: dict | None, done: tuple | None):
        self.spec, self.out, self.resume, self.saved, self.done = spec, out, resume, saved, done

    @classmethod
    def check(cls, data, options: dict, out, overwrite: bool, resume: bool) -> _Member:
        spec = RunSpec.from_options(data, options)
        if spec.stream is not None:
            raise ConfigError("training on the fly (model, hook, text) trains one model at a time; "
                              "harvest the activations to a directory first")
        if out is None:
            return cls(spec, None, False, None, None)
        if resume and io.is_finished(out):
            return cls(spec, out, False, None, (io.load(out), _finished_result(Path(out))))
        can_resume = resume and io.is_resumable(out)
        work = io.prepare_out(out, overwrite=overwrite or resume, resume=can_resume, create=False)
        if not can_resume:
            return cls(spec, out, False, None, None)
        saved = io.read_json(work / io.CONFIG_FILE)
        return cls(RunSpec.for_resume(data, saved, options), out, True, saved, None)


def _finished_result(run_dir: Path) -> TrainResult:
    metrics = io.read_json(run_dir / io.METRICS_FILE)
    return TrainResult(metrics, metrics.get("train_seconds", 0.0), metrics.get("rows_seen", 0),
                       metrics.get("steps", 0), run_dir)


def _train_pass(data, members: list[_Member], *, show: bool, verbose: bool, overwrite: bool, tensorboard: bool,
                wandb: bool, workers: int | None) -> list[tuple]:
    """Set up every model of one pass on the shared data, train them together, return (model, result)."""
    specs = [m.spec for m in members]
    dpass = DataPass.open(data, specs[0], show=show)
    runs: list[TrainingRun] = []
    try:
        for spec in specs:  # fail on a bad model option before any model is built
            dpass.model_config(spec)
        for m in members:
            if m.saved is not None:
                checkpoint.check_same_data(m.saved, dpass.source, dpass.fingerprint, io.partial_dir(Path(m.out)))
        for m, threads in zip(members, plan_threads(specs, dpass, workers)):
            runs.append(TrainingRun(m.spec, dpass, threads=threads, out=m.out, overwrite=overwrite, resume=m.resume,
                                    tensorboard=tensorboard, wandb=wandb))
        hint = "; each unfinished model left a checkpoint, continue with --resume" if members[0].out else ""
        run_pass(runs, dpass.batches(), show=show, workers=workers, resume_hint=hint)
    finally:
        for run in runs:
            run.close()
        dpass.close()
    if verbose:
        for run in runs:
            print_summary(run.result)
    return [(run.model, run.result) for run in runs]
