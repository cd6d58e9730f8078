"""flashsae evaluate: metrics of a trained model on any data of the right width."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Evaluate a trained model on data (MSE, FVU, L0, dead and dense latents) and save the metrics."
EPILOG = """examples:
  flashsae evaluate runs/digits digits
  flashsae evaluate runs/emb heldout.npy --out heldout_metrics.json --json
  flashsae evaluate runs/layer6 --model gpt2 --hook transformer.h.6 --text corpus.jsonl --rows 8192
                                          # spliced into the model: loss recovered, KL (or hidden-state cosine)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train")
    p.add_argument("data", nargs="?", default=None,
                   help="file, shard directory or built-in name (optional with --text)")
    p.add_argument("--key", default=None, help="array name inside a .npz or .safetensors file")
    p.add_argument("--drop-nonfinite", action="store_true", help="skip rows containing NaN or Inf")
    p.add_argument("--out", default=None, help="where to save the metrics (default: RUN_DIR/evaluation.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_downstream_flags(p)


def add_downstream_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("downstream: splice the SAE into a transformers model (flashsae.lm.downstream)")
    g.add_argument("--model", default=None, help="model directory or cached name (default: the one the run's "
                   "activations came from, when recorded)")
    g.add_argument("--hook", default=None, help="module name as in model.named_modules() (default: as recorded)")
    g.add_argument("--text", default=None, help="corpus to evaluate on: .txt, .jsonl, .parquet, a folder or a "
                   "saved datasets directory")
    g.add_argument("--rows", type=int, default=4096, metavar="N", help="token positions to evaluate (default: 4096)")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per context (default: as recorded, else 128)")
    g.add_argument("--lm-batch", type=int, default=8, metavar="N", help="contexts per forward pass (default: 8)")
    g.add_argument("--skip-contexts", type=int, default=None, metavar="N",
                   help="skip this many contexts first (default: those the run's harvest used, on the same corpus)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")


def run(args: argparse.Namespace) -> int:
    from flashsae import io
    from flashsae.cli.common import format_metrics, print_json
    from flashsae.codes import open_for_model
    from flashsae.errors import ConfigError
    from flashsae.eval.evaluate import evaluate

    model = io.load(args.run_dir)
    show = not (args.quiet or args.json)
    if args.data is None and args.text is None:
        raise ConfigError("give DATA, or --text (with --model/--hook) to evaluate spliced into the model")
    metrics = {}
    if args.data is not None:
        source, row_ids = open_for_model(model, args.data, key=args.key, drop_nonfinite=args.drop_nonfinite,
                                         progress=show)
        metrics = {"data": source.name, **evaluate(model, source, row_ids, progress=show)}
    if args.text is not None:
        from flashsae.lm.downstream import evaluate_downstream

        metrics["downstream"] = evaluate_downstream(
            model, text=args.text, model=args.model, hook=args.hook, rows=args.rows, context=args.context,
            batch=args.lm_batch, skip_contexts=args.skip_contexts, device=args.device, run_dir=args.run_dir,
            progress=show)
    out = Path(args.out) if args.out else Path(args.run_dir) / "evaluation.json"
    io.write_json(out, metrics)
    if args.json:
        print_json(metrics)
    elif not args.quiet:
        down = metrics.pop("downstream", None)
        if metrics:
            print(f"{metrics['data']} ({metrics['rows']} rows):\n{format_metrics(metrics)}")
        if down is not None:
            print(f"spliced into {down['model']} at {down['hook']}:\n{format_metrics(down)}")
        print(f"saved to {out}")
    return 0
