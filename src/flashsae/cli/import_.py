"""flashsae import: turn a SAELens or sparsify directory into a flashsae run directory."""
from __future__ import annotations

import argparse

HELP = "Import a SAELens or sparsify SAE directory (detected from its files) as a flashsae run directory."
EPILOG = """examples:
  flashsae import downloaded/blocks.6.hook_resid_post --out runs/imported
  flashsae import sparsify-run/layers.6 --out runs/from-sparsify
  (then: flashsae info runs/imported; flashsae evaluate runs/imported acts/)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="SAELens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json + sae.safetensors)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--json", action="store_true", help="print what was imported as JSON")


def run(args: argparse.Namespace) -> int:
    from flashsae.interop import detect_format, import_dir

    fmt = detect_format(args.dir)
    out = import_dir(args.dir, args.out, overwrite=args.overwrite)
    if args.json:
        from flashsae.cli.common import print_json

        print_json({"format": fmt, "source": str(args.dir), "out": str(out)})
    elif not args.quiet:
        print(f"imported {fmt} SAE from {args.dir} into {out}")
    return 0
