"""flashsae harvest: write a transformers model's activations at one module to a directory of shards."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

HELP = "Capture a transformers model's activations at one module over a text corpus, as shards for training."
EPILOG = """examples:
  flashsae harvest --model gpt2 --hook transformer.h.6 --text corpus.jsonl --out acts/ --rows 10000000
  flashsae harvest --model ./minilm --hook encoder.layer.2 --text docs/ --out acts/ --rows 200000 --context 64
  flashsae harvest ... --format safetensors --dtype bfloat16 --max-norm-factor 10
  (run the same command again to continue an interrupted harvest; then: flashsae train acts/ --out runs/x)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flashsae.cli.common import add_dataclass_flags
    from flashsae.config import field_docs
    from flashsae.lm.harvest import FORMATS, STORE_DTYPES, HarvestConfig

    docs = field_docs(HarvestConfig)
    p.add_argument("--model", required=True, metavar="PATH_OR_NAME", help=docs["model"])
    p.add_argument("--hook", required=True, metavar="MODULE", help=docs["hook"])
    p.add_argument("--text", required=True, metavar="CORPUS", help=docs["text"])
    p.add_argument("--rows", required=True, type=int, metavar="N", help=docs["rows"])
    p.add_argument("--out", required=True, metavar="ACTS_DIR", help="directory to write (resumed when it holds "
                   "a harvest with the same settings)")
    p.add_argument("--format", choices=FORMATS, default=argparse.SUPPRESS, help=docs["format"] + " (default: npy)")
    p.add_argument("--dtype", choices=list(STORE_DTYPES), default=argparse.SUPPRESS,
                   help=docs["dtype"] + " (default: float32)")
    add_dataclass_flags(p, HarvestConfig, skip={"model", "hook", "text", "rows", "format", "dtype"})
    p.add_argument("--overwrite", action="store_true", help="delete ACTS_DIR first instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print the manifest of the harvest as JSON")


def run(args: argparse.Namespace) -> int:
    from flashsae.errors import Interrupted
    from flashsae.lm.harvest import HarvestConfig, harvest

    skip = {"out", "overwrite", "quiet", "json", "command", "_module"}
    cfg = HarvestConfig(**{k: v for k, v in vars(args).items() if k not in skip})
    try:
        manifest = harvest(cfg, args.out, overwrite=args.overwrite, progress=not (args.quiet or args.json))
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(cfg, args.out), signal.SIGINT) from None
    if args.json:
        from flashsae.cli.common import print_json

        print_json(manifest)
    elif not args.quiet:
        print(f"{args.out}: {manifest['rows']:,} rows x {manifest['d_in']} from {cfg.model} at {cfg.hook} "
              f"in {len(manifest['shards'])} shards; next: flashsae train {args.out} --out RUN_DIR")
    return 0


def _interrupted(cfg, out) -> str:
    """What an interrupted harvest kept, and how to continue it (every shard on disk is complete)."""
    from flashsae.lm.activations import MANIFEST_FILE, read_manifest

    if not (Path(out) / MANIFEST_FILE).is_file():
        return "harvest interrupted before anything was written; run the same command again to start it"
    rows = read_manifest(out)["rows"]
    return (f"harvest interrupted with {rows:,} of {cfg.rows:,} rows in {out}; "
            "run the same command again to continue after the last complete shard")
