"""flashsae encode: sparse codes of every row, as a CSR matrix in a .npz file."""
from __future__ import annotations

import argparse

HELP = "Encode rows into sparse codes (CSR .npz, loadable with scipy.sparse.load_npz)."
EPILOG = """examples:
  flashsae encode runs/digits digits --out codes.npz
  python -c "import scipy.sparse as sp; print(sp.load_npz('codes.npz').shape)"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train")
    p.add_argument("data", help="file, shard directory or built-in name")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--key", default=None, help="array name inside a .npz or .safetensors file")
    p.add_argument("--drop-nonfinite", action="store_true", help="skip rows containing NaN or Inf")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="refine the values of the latents the encoder chose by STEPS projected gradient steps "
                        "on the reconstruction error (one-layer SAEs; default: 0, the encoder's own codes)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args: argparse.Namespace) -> int:
    from flashsae.cli.common import load_run
    from flashsae.codes import encode_to_npz, open_for_model
    from flashsae.errors import ConfigError

    if not args.out.endswith(".npz"):
        raise ConfigError(f"--out must end in .npz, got {args.out}")
    model = load_run(args.run_dir)
    source, row_ids = open_for_model(model, args.data, key=args.key, drop_nonfinite=args.drop_nonfinite,
                                     progress=not (args.quiet or args.json))
    codes = encode_to_npz(model, source, row_ids, args.out, progress=not (args.quiet or args.json),
                          refine=args.refine)
    if args.json:
        from flashsae.cli.common import print_json

        print_json({"out": args.out, "rows": codes.shape[0], "latents": codes.shape[1],
                    "nonzero_per_row": codes.nnz / max(codes.shape[0], 1)})
    elif not args.quiet:
        print(f"wrote {codes.shape[0]} x {codes.shape[1]} codes ({codes.nnz / max(codes.shape[0], 1):.2f} "
              f"nonzero per row) to {args.out}")
    return 0
