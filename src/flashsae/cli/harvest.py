"""flashsae harvest: write a transformers model's activations at one or more modules to directories of shards."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

HELP = "Capture a transformers model's activations at one or more modules over a text corpus, as shards for training."
EPILOG = """examples:
  flashsae harvest --model gpt2 --hook transformer.h.6 --text corpus.jsonl --out acts/ --rows 10000000
  flashsae harvest --model ./minilm --hook encoder.layer.2 --text docs/ --out acts/ --rows 200000 --context 64
  flashsae harvest --model gpt2 --hook transformer.h.4 transformer.h.6 transformer.h.8 --text corpus.jsonl \
      --out acts/ --rows 1000000      # one forward pass; acts/transformer.h.6/ is a harvest directory
  flashsae harvest ... --format safetensors --dtype bfloat16 --max-norm-factor 10
  (run the same command again to continue an interrupted harvest; then: flashsae train acts/ --out runs/x)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flashsae.cli.common import add_dataclass_flags
    from flashsae.config import field_docs
    from flashsae.lm.harvest import FORMATS, STORE_DTYPES, HarvestConfig

    docs = field_docs(HarvestConfig)
    p.add_argument("--model", required=True, metavar="PATH_OR_NAME", help=docs["model"])
    p.add_argument("--hook", required=True, nargs="+", metavar="MODULE", help=docs["hook"])
    p.add_argument("--text", required=True, metavar="CORPUS", help=docs["text"])
    p.add_argument("--rows", required=True, type=int, metavar="N", help=docs["rows"])
    p.add_argument("--out", required=True, metavar="ACTS_DIR", help="directory to write (resumed when it holds "
                   "a harvest with the same settings); with several hooks, one harvest directory per hook in it")
    p.add_argument("--format", choices=FORMATS, default=argparse.SUPPRESS, help=docs["format"] + " (default: npy)")
    p.add_argument("--dtype", choices=list(STORE_DTYPES), default=argparse.SUPPRESS,
                   help=docs["dtype"] + " (default: float32)")
    add_dataclass_flags(p, HarvestConfig, skip={"model", "hook", "text", "rows", "format", "dtype"})
    p.add_argument("--overwrite", action="store_true", help="delete ACTS_DIR first instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print the manifest of the harvest as JSON "
                   "(with several hooks: the manifests by hook)")


def run(args: argparse.Namespace) -> int:
    from flashsae.errors import Interrupted
    from flashsae.lm.harvest import HarvestConfig, harvest_many, hook_dirs

    skip = {"out", "overwrite", "quiet", "json", "command", "subcommand", "hook"}
    hook = args.hook[0] if len(args.hook) == 1 else tuple(args.hook)
    cfg = HarvestConfig(hook=hook, **{k: v for k, v in vars(args).items() if k not in skip})
    try:
        manifests = harvest_many(cfg, args.out, overwrite=args.overwrite, progress=not (args.quiet or args.json))
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(cfg, hook_dirs(cfg, args.out)), signal.SIGINT) from None
    if args.json:
        from flashsae.cli.common import print_json

        print_json(manifests[cfg.hooks[0]] if len(manifests) == 1 else manifests)
    elif not args.quiet:
        for h, path in hook_dirs(cfg, args.out).items():
            m = manifests[h]
            print(f"{path}: {m['rows']:,} rows x {m['d_in']} from {cfg.model} at {h} in {len(m['shards'])} shards")
        example = next(iter(hook_dirs(cfg, args.out).values()))
        print(f"next: flashsae train {example} --out RUN_DIR")
    return 0


def _interrupted(cfg, dirs: dict[str, Path]) -> str:
    """What an interrupted harvest kept, and how to continue it (every shard on disk is complete)."""
    from flashsae.lm.activations import MANIFEST_FILE, read_manifest

    kept = {path: read_manifest(path)["rows"] for path in dirs.values() if (path / MANIFEST_FILE).is_file()}
    if not kept:
        return "harvest interrupted before anything was written; run the same command again to start it"
    if len(dirs) == 1:
        path, rows = next(iter(kept.items()))
        where = f"{rows:,} of {cfg.rows:,} rows in {path}"
    else:
        where = ", ".join(f"{rows:,} rows in {path}" for path, rows in kept.items())
    return f"harvest interrupted with {where}; run the same command again to continue after the last complete shard"
