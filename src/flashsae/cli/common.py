"""Helpers shared by subcommands: flags generated from config dataclasses, output formatting."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from flashsae.config import field_docs


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
        add_field_flag(parser, f, docs.get(f.name, "") + _default_note({cls.__name__: f.default}),
                       flag=names.get(f.name))


def add_model_flags(p: argparse.ArgumentParser, wrap=lambda group: group) -> None:
    """--arch and every architecture's options, from the registry at call time.

    The options every architecture shares (`ModelConfig`'s) go in the "model" group; the others in
    one group per set of architectures that has them ("batchtopk and topk options"), each flag
    defined once with every owner's own default in its help. `wrap` as in `flashsae.cli.train`.
    """
    from flashsae import models

    shared = {f.name for f in dataclasses.fields(models.ModelConfig)}
    model = wrap(p.add_argument_group("model"))
    model.add_argument("--arch", dest="architecture", default=argparse.SUPPRESS, choices=models.names(),
                       help=f"architecture (default: {models.DEFAULT})")
    by_owners: dict[tuple[str, ...], list[str]] = {}
    defaults = models.options()
    for name, per_arch in defaults.items():
        by_owners.setdefault(() if name in shared else tuple(per_arch), []).append(name)
    for owners, option_names in by_owners.items():
        group = model if not owners else wrap(p.add_argument_group(f"{_joined(owners)} options"))
        for name in option_names:
            cls = models.ModelConfig if not owners else models.get(owners[0]).config_cls
            f = next(f for f in dataclasses.fields(cls) if f.name == name)
            add_field_flag(group, f, field_docs(cls).get(name, "") + _default_note(defaults[name]),
                           flag="latents" if name == "d_sae" else None)


def add_field_flag(parser, f: dataclasses.Field, help_text: str, *, flag: str | None = None) -> None:
    """The flag `--field-name` (or `--flag`) of one dataclass field, parsed by the field's type."""
    flag = "--" + (flag or f.name).replace("_", "-")
    t = _type_name(f.type)
    kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if t == "bool":
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


def _type_name(t) -> str:
    """A field's annotation as written ("int | None"), also when it is a type, not a string."""
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "").strip()


def _default_note(defaults: dict[str, object]) -> str:
    """" (default: X)" for help text; " (default: X; kl: Y)" when the owners' defaults differ.

    Nothing when no owner has a default other than None or () (the docstring says what None picks).
    """
    if all(v in (None, (), dataclasses.MISSING) for v in defaults.values()):
        return ""
    by_value: dict[str, list[str]] = {}
    for arch, value in defaults.items():
        by_value.setdefault(str(None if value is dataclasses.MISSING else value), []).append(arch)
    ranked = sorted(by_value.items(), key=lambda item: -len(item[1]))
    if len(ranked) == 1:
        return f" (default: {ranked[0][0]})"
    if len(ranked[0][1]) * 2 > len(defaults):  # most owners agree: name only the exceptions
        head, rest = ranked[0][0], ranked[1:]
        return f" (default: {head}; " + "; ".join(f"{_joined(archs)}: {v}" for v, archs in rest) + ")"
    return " (default: " + "; ".join(f"{_joined(archs)}: {v}" for v, archs in ranked) + ")"


def _joined(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


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
