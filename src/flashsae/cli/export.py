"""flashsae export: write a run in another library's on-disk layout."""
from __future__ import annotations

import argparse

HELP = "Export a trained model to another library's layout (SAELens: cfg.json + sae_weights.safetensors)."
EPILOG = """examples:
  flashsae export runs/layer6 --format saelens --out exported/layer6
  (then, in Python: sae_lens.SAE.load_from_disk("exported/layer6"))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train")
    p.add_argument("--format", choices=["saelens"], default="saelens", help="target layout (default: saelens)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args: argparse.Namespace) -> int:
    from flashsae.cli.common import require_run_dir
    from flashsae.interop import export_saelens

    require_run_dir(args.run_dir)
    out = export_saelens(args.run_dir, args.out, overwrite=args.overwrite)
    if args.json:
        from flashsae.cli.common import print_json

        print_json({"out": str(out), "format": args.format})
    elif not args.quiet:
        print(f"wrote {out} ({args.format})")
    return 0
