"""Grids of models: expand options with several values, train every point, tabulate and plot the trade-off.

A grid may span architectures that take different options (`arch=["topk", "relu-l1"]`, `k=[4, 8]`,
`l1=[0.1]`): each point gets only the model options its architecture has, and points that become
the same once the others are dropped are trained once (`fit_to_architectures`).

The grid and the artifacts (names, OUT/<name> run directories, sweep.csv, tradeoff.png) are kept
apart from how the models are trained: `run_grid` hands the points to `train_each`, which trains
them together on one data pass with `train_many` (points that read the data differently get a pass
each), or one after another with `train()` when asked to. Imports train.api, train.spec,
io and viz (lazily).
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flashsae import distributed, io, models
from flashsae.errors import ConfigError
from flashsae.train.spec import ALIASES, RunSpec

METRIC_COLUMNS = ("fvu", "fvu_standardized", "mse", "l0", "dead_fraction", "dense_fraction", "rows_per_s",
                  "train_seconds")
SHORT_NAMES = {"architecture": "arch", "d_sae": "latents"}
# Under torchrun the ranks of a sweep wait for each other only at the end, after training models of
# different sizes; gloo notices a dead rank at once, so this bounds only a rank that hangs.
SWEEP_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass
class SweepResult:
    rows: list[dict]   # one per model: name, its options, metrics, run_dir (the rows of sweep.csv)
    out: Path


def expand_grid(axes: dict[str, list], fixed: dict | None = None) -> list[dict]:
    """Cartesian product of `axes` (option -> values), each point completed with the `fixed` options.

    Points are ordered like nested loops with the last axis varying fastest. Option names are
    canonical (`arch` -> `architecture`, `latents` -> `d_sae`). A model option reaches only the
    points whose architecture has it, and points made equal by that are kept once
    (`fit_to_architectures`).

    Raises:
        ConfigError: an axis has no values, an option is both an axis and fixed, or a model option
            belongs to none of the grid's architectures.
    """
    axes = {ALIASES.get(k, k): list(v) for k, v in axes.items()}
    fixed = {ALIASES.get(k, k): v for k, v in (fixed or {}).items()}
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"grid option {key!r} has no values")
        if key in fixed:
            raise ConfigError(f"option {key!r} is given both as a grid axis and as a fixed value")
    return fit_to_architectures([{**fixed, **dict(zip(axes, combo))} for combo in itertools.product(*axes.values())])


def fit_to_architectures(grid: list[dict]) -> list[dict]:
    """The points with the model options their architecture lacks dropped, when another point's
    architecture has them; a point that lost options and equals an earlier point is left out.

    Options that are no architecture's (training and data options, typos) are left for `RunSpec`
    to check. Points that lose nothing are kept as they are.

    Raises:
        ConfigError: a model option that no architecture of the grid has.
    """
    per_arch = models.options()  # option -> {architecture: default}
    archs = [point.get("architecture") or models.DEFAULT for point in grid]
    own = {arch: {f.name for f in dataclasses.fields(models.get(arch).config_cls)} for arch in set(archs)}
    for key in sorted({k for point in grid for k in point} & set(per_arch)):
        if not any(key in own[arch] for arch in own):
            appliers = sorted(per_arch[key])
            grid_archs = sorted(own)
            where = f"architecture {grid_archs[0]!r}" if len(grid_archs) == 1 else \
                f"any architecture of the grid ({', '.join(grid_archs)})"
            raise ConfigError(f"option {key!r} applies to {', '.join(appliers)}, not to {where}")
    out: list[dict] = []
    for point, arch in zip(grid, archs):
        kept = {k: v for k, v in point.items() if k not in per_arch or k in own[arch]}
        if len(kept) < len(point) and any(_same(kept, other) for other in out):
            continue
        out.append(kept)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(repr(a[k]) == repr(b[k]) for k in a)


def varied_keys(grid: list[dict]) -> list[str]:
    """Options whose value differs between points, in first-seen order."""
    keys: list[str] = []
    for point in grid:
        keys += [k for k in point if k not in keys]
    return [k for k in keys if len({repr(p.get(k)) for p in grid}) > 1]


def point_names(grid: list[dict]) -> list[str]:
    """Directory names for the points, from the options that vary and that each point has:
    `k-8`, `arch-topk_k-4`, `arch-relu-l1_l1-0.1`."""
    keys = varied_keys(grid)
    names = ["_".join(f"{SHORT_NAMES.get(k, k).replace('_', '-')}-{_fmt_value(point[k])}" for k in keys
                      if k in point) or "model" for point in grid]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # equal names only when values format alike (1e-05 vs 1e-5)
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name}_{seen[name]}"
    return names


def _fmt_value(v) -> str:
    text = f"{v:g}" if isinstance(v, float) else str(v)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "none"


def validate_grid(grid: list[dict]) -> None:
    """Check every point's options before any model is trained (a typo fails in seconds, not hours)."""
    if not grid:
        raise ConfigError("the grid is empty")
    for point in grid:
        RunSpec.from_options(None, point)


def run_grid(data, grid: list[dict], out, *, overwrite: bool = False, resume: bool = False, quiet: bool = False,
             tensorboard: bool = False, wandb: bool = False, separate: bool = False,
             comm: distributed.Comm | None = None) -> SweepResult:
    """Train one model per grid point into OUT/<name>; write OUT/sweep.csv and OUT/tradeoff.png.

    The models share one data pass (`train_many`): the data is read, scanned and standardised
    once and every batch trains every model; the models equal those `train()` gives one by one.
    Under torchrun the points are shared out: rank r of W trains points r, r + W, ... alone (on
    GPU LOCAL_RANK when there are GPUs; one pass over its share), then rank 0 reads every model's
    metrics.json and writes the table and the plot; the other ranks return an empty SweepResult.

    Args:
        data: what `train()` accepts (array, path or built-in name), shared by every point.
        grid: one dict of `train()` options per model (see `expand_grid`).
        out: sweep directory.
        overwrite: replace existing model directories and tables in `out`.
        resume: continue an interrupted sweep in `out`: finished models are kept, interrupted ones
            continue from their checkpoints, the others start.
        quiet: no progress bars or summaries.
        tensorboard, wandb: extra log sinks for every model (see `train()`); W&B trains the models
            one by one (a process holds one W&B run).
        separate: train the models one after another with `train()`, each reading the data itself.
        comm: the ranks to share the grid between; None joins torchrun's when WORLD_SIZE > 1.

    Returns:
        SweepResult with one row per model, in grid order.

    Raises:
        ConfigError: `out` exists and is not empty (without overwrite), or a grid point is invalid.
    """
    grid = fit_to_architectures([{ALIASES.get(k, k): v for k, v in point.items()} for point in grid])
    validate_grid(grid)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise ConfigError(f"output directory {out} already exists; pass --overwrite to replace it "
                          "or --resume to continue it")
    comm = comm if comm is not None else distributed.from_env(SWEEP_TIMEOUT_S, gpu_collectives=False)
    comm.barrier()  # every rank has checked `out` before any rank writes into it
    out.mkdir(parents=True, exist_ok=True)
    names = point_names(grid)
    mine = list(range(comm.rank, len(grid), comm.world_size))
    if torch.cuda.is_available():
        comm.device(torch.device("cuda"))  # this rank's GPU becomes the default "cuda"
    trained = train_each(data, [grid[i] for i in mine], [out / names[i] for i in mine], overwrite=overwrite,
                         resume=resume, quiet=quiet or not comm.is_main(), tensorboard=tensorboard, wandb=wandb,
                         separate=separate)
    comm.barrier()  # every model is written
    if not comm.is_main():
        return SweepResult([], out)
    done = dict(zip(mine, trained))
    results = [done.get(i) or (io.read_json(out / names[i] / io.METRICS_FILE), out / names[i])
               for i in range(len(grid))]
    keys = varied_keys(grid) or list(grid[0])
    rows = [sweep_row(name, point, keys, metrics, run_dir)
            for name, point, (metrics, run_dir) in zip(names, grid, results)]
    write_artifacts(out, rows)
    return SweepResult(rows, out)


def sweep(data=None, out=None, *, grid: dict[str, list], overwrite: bool = False, resume: bool = False,
          quiet: bool = False, tensorboard: bool = False, wandb: bool = False, separate: bool = False,
          **options) -> SweepResult:
    """Train a grid: `sweep("digits", "runs/sweep", grid={"k": [4, 8, 16]}, latents=256)`.

    Every option in `grid` takes each of its values in turn (cartesian product); `options` are
    shared by all models. A model option goes only to the architectures that have it:
    `grid={"arch": ["topk", "relu-l1"], "k": [4, 8], "l1": [0.1]}` trains three models
    (`arch-topk_k-4`, `arch-topk_k-8`, `arch-relu-l1_l1-0.1`). See `run_grid` for what is written.
    """
    if out is None:
        raise ConfigError("a sweep needs an output directory (out=...)")
    return run_grid(data, expand_grid(grid, options), out, overwrite=overwrite, resume=resume, quiet=quiet,
                    tensorboard=tensorboard, wandb=wandb, separate=separate)


def train_each(data, grid: list[dict], run_dirs: list[Path], *, overwrite: bool, quiet: bool,
               tensorboard: bool, wandb: bool, separate: bool = False, resume: bool = False) -> list[tuple[dict, Path]]:
    """Train the grid's models; return (held-out metrics, run directory) per point.

    One data pass for all of them (`train_many`) unless `separate` (or W&B logging of several
    models) asks for one `train()` after another.
    """
    from flashsae.train.api import train, train_many

    if not grid:
        return []
    if not separate and not (wandb and len(grid) > 1):
        if not quiet:
            print(f"training {len(grid)} models on one data pass: {', '.join(d.name for d in run_dirs)}", flush=True)
        trained = train_many(data, grid, outs=run_dirs, overwrite=overwrite, resume=resume, quiet=quiet,
                             tensorboard=tensorboard, wandb=wandb)
        return [(result.metrics, result.run_dir) for _, result in trained]
    results = []
    for i, (point, run_dir) in enumerate(zip(grid, run_dirs)):
        if resume and io.is_finished(run_dir):
            results.append((io.read_json(run_dir / io.METRICS_FILE), run_dir))  # finished before
            continue
        if not quiet:
            print(f"[{i + 1}/{len(grid)}] {run_dir.name}", flush=True)
        again = resume and io.is_resumable(run_dir)
        _, result = train(data, out=run_dir, overwrite=overwrite or resume, resume=again, quiet=quiet,
                          tensorboard=tensorboard, wandb=wandb, comm=distributed.LOCAL, **point)
        results.append((result.metrics, result.run_dir))
    return results


def sweep_row(name: str, point: dict, keys: list[str], metrics: dict, run_dir: Path) -> dict:
    """One row of sweep.csv: name, the varied options, architecture and size as they ran, metrics."""
    cfg = io.read_json(Path(run_dir) / io.CONFIG_FILE)
    row = {"name": name}
    row.update({k: point.get(k, "") for k in keys})
    row.setdefault("architecture", cfg["architecture"])
    row.setdefault("d_sae", cfg["model"]["d_sae"])
    row.update({m: metrics.get(m, "") for m in METRIC_COLUMNS})
    row["run_dir"] = Path(run_dir).name
    return row


def write_artifacts(out: Path, rows: list[dict]) -> None:
    """sweep.csv (one row per model) and tradeoff.png (L0 against FVU, table beside)."""
    from flashsae.viz import plots

    write_table(Path(out) / io.SWEEP_TABLE_FILE, rows)
    plots.tradeoff(rows, Path(out) / io.TRADEOFF_FILE)


def write_table(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with io.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})


def _cell(v):
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


def read_table(path: Path) -> list[dict]:
    """sweep.csv back as a list of dicts (numbers parsed where they parse)."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
