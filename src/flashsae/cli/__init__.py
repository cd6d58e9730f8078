"""Command-line interface: `flashsae SUBCOMMAND ...`. One module per subcommand.

Each subcommand module defines `HELP`, `EPILOG`, `add_arguments(parser)` and `run(args) -> int`,
and imports nothing heavy at module level. A subcommand's flags are added when that subcommand
is parsed or its help is shown (`flashsae train` asks the model registry, which imports torch), so
`flashsae --help` and `build_parser()` import no torch.
Errors a user can cause print one line `flashsae: error: ...` and exit 2; a bad flag prints
`flashsae SUBCOMMAND: error: ... (see flashsae SUBCOMMAND --help)` and exits 2.
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

EPILOG = """examples:
  flashsae train --out runs/digits                    # TopK SAE on the bundled digits data set
  flashsae train data.npy --latents 4096 --k 32 --out runs/mine
  flashsae info runs/digits                           # sizes, options, data and held-out metrics
  flashsae encode runs/mine data.npy --out codes.npz  # sparse codes as a scipy CSR matrix
  flashsae sweep digits --k 4 8 16 --out runs/sweep   # a grid of models on one data pass
  flashsae report runs/sweep                          # one HTML page with tables and plots

flashsae COMMAND --help lists a command's options; defaults marked "from the data" depend on the
rows given (--latents is 8 x the input width, fewer when rows are few; the batch size and the
number of training rows follow the number of rows).
"""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and a pointer to --help, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class SubcommandParser(Parser):
    """A subcommand's parser, filled with the subcommand's flags on first use (parsing or help)."""

    def __init__(self, *args, module=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.module = module
        self._filled = module is None

    def fill(self) -> SubcommandParser:
        """Add the subcommand's flags (once); returns the parser."""
        if not self._filled:
            self._filled = True
            self.module.add_arguments(self)
            self.set_defaults(subcommand=self.module)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.fill()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.fill()
        return super().format_usage()

    def format_help(self) -> str:
        self.fill()
        return super().format_help()


class _TopParser(Parser):
    def parse_args(self, args=None, namespace=None):
        # Flags the subcommand does not know are reported by the subcommand, with its own --help.
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            subcommand_parser(self, getattr(ns, "command", None)).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns


def build_parser() -> argparse.ArgumentParser:
    """The `flashsae` parser; each subcommand's flags are added when it is parsed or its help shown."""
    from flashsae import __version__

    parser = _TopParser(prog="flashsae", description="Train sparse autoencoders fast on any numeric data.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"flashsae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=SubcommandParser)
    parser.subcommands = sub.choices  # name -> SubcommandParser (argparse keeps them on a private action)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=getattr(module, "EPILOG", None),
                       formatter_class=argparse.RawDescriptionHelpFormatter, module=module)
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand `name` with its flags (the top parser itself when `name` is None)."""
    subcommands = getattr(parser, "subcommands", {})
    return subcommands[name].fill() if name in subcommands else parser


def main(argv: list[str] | None = None) -> int:
    from flashsae.errors import ConfigError, FlashSAEError, Interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.subcommand.run(args) or 0)
    except Interrupted as e:  # a checkpoint was written; the message says how to continue
        print(f"flashsae: {e}", file=sys.stderr)
        return e.exit_code
    except FlashSAEError as e:
        message = str(e)
        if isinstance(e, ConfigError):  # option names as the user typed them: d_sae -> --latents
            from flashsae.cli.common import with_flag_names

            message = with_flag_names(message, subcommand_parser(parser, args.command))
        print(f"flashsae: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashsae: interrupted", file=sys.stderr)
        return 130
