"""Helpers shared by subcommands: flags generated from config dataclasses, output formatting."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from flashsae.config import field_docs


def _parse_bool_field(type_str: str) -> bool:
    return type_str.strip() == "bool"


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, *, skip=(),
                        names: dict[str, str] | None = None, seen: set | None = None) -> None:
    """One flag per field (`--field-name`), help from the field's docstring; defaults are left to the config."""
    docs = field_docs(cls)
    names = names or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or (seen is not None and f.name in seen):
            continue
        if seen is not None:
            seen.add(f.name)
        flag = "--" + names.get(f.name, f.name).replace("_", "-")
        t = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        if default not in (None, ()) and "None picks" not in help_text:
            help_text += f" (default: {default})"
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if _parse_bool_field(t):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif t.startswith("tuple[int, ...]"):
            parser.add_argument(flag, type=int, nargs="*", metavar="N", **kw)
        elif t.startswith("tuple[int, int]"):
            parser.add_argument(flag, type=int, nargs=2, metavar=("H", "W"), **kw)
        elif t.startswith("int"):
            parser.add_argument(flag, type=int, metavar="N", **kw)
        elif t.startswith("float"):
            parser.add_argument(flag, type=float, metavar="X", **kw)
        else:
            parser.add_argument(flag, type=str, metavar="S", **kw)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def format_metrics(metrics: dict) -> str:
    lines = []
    for key, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        lines.append(f"  {key:<18} {value}")
    return "\n".join(lines)
