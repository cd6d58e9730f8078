"""flashsae evaluate: metrics of a trained model on any data of the right width."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Evaluate a trained model on data (MSE, FVU, L0, dead and dense latents) and save the metrics."
EPILOG = """examples:
  flashsae evaluate runs/digits digits
  flashsae evaluate runs/emb heldout.npy --out heldout_metrics.json --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train")
    p.add_argument("data", help="file, shard directory or built-in name")
    p.add_argument("--key", default=None, help="array name inside a .npz or .safetensors file")
    p.add_argument("--drop-nonfinite", action="store_true", help="skip rows containing NaN or Inf")
    p.add_argument("--out", default=None, help="where to save the metrics (default: RUN_DIR/evaluation.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from flashsae import io
    from flashsae.cli.common import format_metrics, print_json
    from flashsae.codes import open_for_model
    from flashsae.eval.evaluate import evaluate

    model = io.load(args.run_dir)
    show = not (args.quiet or args.json)
    source, row_ids = open_for_model(model, args.data, key=args.key, drop_nonfinite=args.drop_nonfinite, progress=show)
    metrics = {"data": source.name, **evaluate(model, source, row_ids, progress=show)}
    out = Path(args.out) if args.out else Path(args.run_dir) / "evaluation.json"
    io.write_json(out, metrics)
    if args.json:
        print_json(metrics)
    else:
        print(f"{source.name} ({metrics['rows']} rows):\n{format_metrics(metrics)}\nsaved to {out}")
    return 0
