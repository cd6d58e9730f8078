"""flashsae report: one self-contained HTML page for a run or a sweep directory."""
from __future__ import annotations

import argparse

HELP = "Write one self-contained HTML page (config, metrics, curves, atoms, reconstructions) for a run or sweep."
EPILOG = """The page embeds its images and styles, so it opens offline and can be shared as one file.
A sweep directory (from flashsae sweep) gets the trade-off plot and the table of models.

examples:
  flashsae report runs/digits                       # writes runs/digits/report.html
  flashsae report runs/sweep --out sweep.html
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (flashsae train) or sweep directory (flashsae sweep)")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--json", action="store_true", help="print the report's path as JSON")


def run(args: argparse.Namespace) -> int:
    from flashsae.cli.common import print_json
    from flashsae.viz.report import write_report

    out = write_report(args.run_dir, args.out)
    if args.json:
        print_json({"report": str(out), "bytes": out.stat().st_size})
    elif not args.quiet:
        print(f"wrote {out}")
    return 0
