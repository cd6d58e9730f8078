"""flashsae sweep: train a grid of models (every option given several values is an axis)."""
from __future__ import annotations

import argparse

HELP = "Train a grid of sparse autoencoders and compare their sparsity / reconstruction trade-off."
EPILOG = """Any model, data or training option given several values is a grid axis; the grid is the cartesian
product of the axes. A model option goes only to the architectures that have it, so one grid can
span architectures (--arch topk relu-l1 --k 4 8 --l1 0.1 trains arch-topk_k-4, arch-topk_k-8 and
arch-relu-l1_l1-0.1). Each model is a normal run directory OUT/<name>; OUT/sweep.csv has one row
per model and OUT/tradeoff.png plots FVU against L0. The models train together on one pass over the
data (one pass per value of a data option, --seed, --batch-size or --device); on the CPU, models
whose steps are small enough for one thread step side by side on the cores, one thread each
(--threads N trains each model on N threads, one model at a time). --separate trains them one after
another. The models come out as `flashsae train` gives them (with --threads 1 for models stepped
side by side).

examples:
  flashsae sweep digits --k 4 8 16 32 --out runs/sweep
  flashsae sweep digits --arch relu-l1 --l1 0.01 0.1 1 --out runs/l1
  flashsae sweep digits --arch topk relu-l1 --k 4 8 --l1 0.1 --out runs/mixed
  flashsae sweep data.npy --k 8 32 --latents 1024 4096 --rows 2000000 --out runs/grid
  flashsae report runs/sweep                     # one HTML page with the table and the plot
"""


class _SeveralValues:
    """Stands in for an argument group: scalar options accept one or more values."""

    def __init__(self, group, grid_dests: set[str]):
        self.group = group
        self.grid_dests = grid_dests

    def add_argument(self, *flags, **kwargs):
        if "nargs" not in kwargs and kwargs.get("action") is None:
            kwargs["nargs"] = "+"
            if "choices" in kwargs:
                kwargs.setdefault("metavar", "NAME")  # the choices are listed in the help text instead
                kwargs["help"] = f"{kwargs.get('help', '')}; one or more of: {', '.join(kwargs['choices'])}"
            self.grid_dests.add(kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_"))
        return self.group.add_argument(*flags, **kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flashsae.cli.train import add_log_flags, add_option_flags

    p.add_argument("data", nargs="?", default=None,
                   help="file, shard directory, or built-in name: digits (default) or synthetic")
    p.add_argument("--out", required=True,
                   help="sweep directory: OUT/<name> per model, OUT/sweep.csv, OUT/tradeoff.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing models and tables in OUT")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep in OUT with the same options: finished models are kept, "
                        "interrupted ones continue from their checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    p.add_argument("--json", action="store_true", help="print the sweep table as JSON")
    p.add_argument("--separate", action="store_true",
                   help="train the models one after another instead of together on one data pass")
    add_log_flags(p)
    grid_dests: set[str] = set()
    add_option_flags(p, wrap=lambda group: _SeveralValues(group, grid_dests))
    p.set_defaults(grid_dests=frozenset(grid_dests))


def run(args: argparse.Namespace) -> int:
    from flashsae import io
    from flashsae.cli.common import print_json
    from flashsae.train.sweep import run_grid

    result = run_grid(args.data, grid_from_args(args), args.out, overwrite=args.overwrite, resume=args.resume,
                      quiet=args.quiet or args.json, tensorboard=args.tensorboard, wandb=args.wandb,
                      separate=args.separate)
    if not result.rows:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if args.json:
        print_json({"out": str(result.out), "models": result.rows})
    elif not args.quiet:
        print(format_table(result.rows))
        out = result.out
        print(f"wrote {len(result.rows)} models, {out / io.SWEEP_TABLE_FILE} and {out / io.TRADEOFF_FILE}")
    return 0


def grid_from_args(args: argparse.Namespace) -> list[dict]:
    """The grid of train() options: options given several values are axes, the rest are shared."""
    from flashsae.train.sweep import expand_grid

    skip = {"data", "out", "overwrite", "resume", "quiet", "json", "separate", "tensorboard", "wandb", "command",
            "subcommand", "grid_dests"}
    axes, fixed = {}, {}
    for key, value in vars(args).items():
        if key in skip:
            continue
        if key in args.grid_dests and len(value) > 1:
            axes[key] = value
        else:
            fixed[key] = value[0] if key in args.grid_dests else value
    return expand_grid(axes, fixed)


def format_table(rows: list[dict]) -> str:
    header = f"  {'model':<24} {'L0':>8} {'FVU':>8} {'dead':>7} {'rows/s':>10}"
    lines = [header]
    for r in rows:
        lines.append(f"  {r['name']:<24} {r['l0']:>8.2f} {r['fvu']:>8.4f} {100 * r['dead_fraction']:>6.1f}% "
                     f"{r['rows_per_s']:>10,.0f}")
    return "\n".join(lines)
