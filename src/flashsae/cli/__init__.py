"""Command-line interface: `flashsae SUBCOMMAND ...`. One module per subcommand, imported on use.

Each subcommand module defines `HELP`, `EPILOG`, `add_arguments(parser)` and `run(args) -> int`.
Errors a user can cause print one line `flashsae: error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": "flashsae.cli.train",
    "evaluate": "flashsae.cli.evaluate",
    "encode": "flashsae.cli.encode",
    "decode": "flashsae.cli.decode",
    "info": "flashsae.cli.info",
    "sweep": "flashsae.cli.sweep",
    "report": "flashsae.cli.report",
    "harvest": "flashsae.cli.harvest",
    "browse": "flashsae.cli.browse",
    "export": "flashsae.cli.export",
    "import": "flashsae.cli.import_",
}


def build_parser() -> argparse.ArgumentParser:
    from flashsae import __version__

    parser = argparse.ArgumentParser(prog="flashsae", description="Train sparse autoencoders fast on any numeric data.")
    parser.add_argument("--version", action="version", version=f"flashsae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=getattr(module, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(subcommand=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flashsae.errors import FlashSAEError, Interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.subcommand.run(args) or 0)
    except Interrupted as e:  # a checkpoint was written; the message says how to continue
        print(f"flashsae: {e}", file=sys.stderr)
        return e.exit_code
    except FlashSAEError as e:
        print(f"flashsae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashsae: interrupted", file=sys.stderr)
        return 130
