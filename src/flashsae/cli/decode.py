"""flashsae decode: map sparse codes back to rows in the data's own units."""
from __future__ import annotations

import argparse

HELP = "Decode sparse codes (.npz from flashsae encode) back to rows, written as .npy."
EPILOG = """example:
  flashsae decode runs/digits codes.npz --out reconstruction.npy
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train")
    p.add_argument("codes", help=".npz file written by flashsae encode")
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args: argparse.Namespace) -> int:
    from flashsae.cli.common import load_run
    from flashsae.codes import decode_to_npy, open_codes
    from flashsae.errors import ConfigError

    if not args.out.endswith(".npy"):
        raise ConfigError(f"--out must end in .npy, got {args.out}")
    model = load_run(args.run_dir)
    codes = open_codes(args.codes, model.d_sae)  # memory-mapped when flashsae encode wrote it
    decode_to_npy(model, codes, args.out)
    if args.json:
        from flashsae.cli.common import print_json

        print_json({"out": args.out, "rows": codes.shape[0], "columns": model.d_in})
    elif not args.quiet:
        print(f"wrote {codes.shape[0]} x {model.d_in} rows to {args.out}")
    return 0
