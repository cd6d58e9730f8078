"""Helpers shared by subcommands: flags generated from config dataclasses, option names in messages,
output formatting. Imports config (no torch); the model registry only inside `add_model_flags`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from flashsae.config import field_docs

FLAG_NAMES = {"d_sae": "latents"}
"""Config fields whose flag is not `--field-name`. Messages that reach the command line name the
flag (`with_flag_names`), which the parser derives from this mapping."""

DATA_DEFAULTS = {"d_sae": "8 x the input width, fewer for fewer than 64 training rows per column"}
"""Defaults that come from the data, for fields whose docstring does not say so."""

FROM_DATA = frozenset({"d_sae", "batch_size", "rows", "lr", "dead_after_rows", "threads", "k_aux"})
"""Fields whose default depends on the data (its rows, its width, or --latents which follows the width)."""


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
        add_field_flag(parser, f, field_help(f.name, docs.get(f.name, ""), {cls.__name__: f.default}),
                       flag=names.get(f.name, FLAG_NAMES.get(f.name)))


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
            add_field_flag(group, f, field_help(name, field_docs(cls).get(name, ""), defaults[name]),
                           flag=FLAG_NAMES.get(name))


def add_field_flag(parser, f: dataclasses.Field, help_text: str, *, flag: str | None = None) -> None:
    """The flag `--field-name` (or `--flag`) of one dataclass field, parsed by the field's type."""
    flag = "--" + (flag or f.name).replace("_", "-")
    t = _type_name(f.type)
    kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if t == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif t.startswith("tuple[int, ...]"):
        parser.add_argument(flag, type=int, nargs="*", metavar="N", **kw)
    elif t.startswith("tuple[float, ...]"):
        parser.add_argument(flag, type=float, nargs="*", metavar="X", **kw)
    elif t.startswith("tuple[int, int]"):
        parser.add_argument(flag, type=int, nargs=2, metavar=("H", "W"), **kw)
    elif t.startswith("int"):
        parser.add_argument(flag, type=int, metavar="N", **kw)
    elif t.startswith("float"):
        parser.add_argument(flag, type=float, metavar="X", **kw)
    else:
        parser.add_argument(flag, type=str, metavar="S", **kw)


def field_help(name: str, doc: str, defaults: dict[str, object]) -> str:
    """A field's --help: its docstring, with what None picks said as the default (marked "from the
    data" where it depends on the data), and the owners' defaults."""
    label = "default from the data" if name in FROM_DATA else "default"
    text = re.sub(r"(^|; )None(?: picks|:) ", lambda m: f"{m.group(1)}{label}: ", doc)
    if name in DATA_DEFAULTS:
        text = f"{text} ({label}: {DATA_DEFAULTS[name]})"
    return text + _default_note(defaults)


def with_flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """`message` with the config field names it mentions spelled as `parser`'s flags (d_sae -> --latents).

    A field with an underscore in its name is an identifier wherever it appears; a one-word field
    (`k`, `rows`) is renamed only as the subject of a check ("rows must be >= 1") or in "option 'k'".
    """
    actions = parser._actions  # noqa: SLF001 - argparse has no public accessor for a parser's flags
    flags = {a.dest: max(a.option_strings, key=len) for a in actions
             if a.option_strings and a.dest not in ("help", "version")}
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    edge = r"(?<![\w./-])"

    def flag(m: re.Match) -> str:
        return flags[m.group("name")]

    message = re.sub(rf"option '(?P<name>{names})'", lambda m: f"option {flag(m)}", message)
    message = re.sub(rf"{edge}(?P<name>{names})(?=(?: \([^)]*\))? must )", flag, message)
    underscored = "|".join(sorted((re.escape(n) for n in flags if "_" in n), key=len, reverse=True))
    if underscored:
        message = re.sub(rf"{edge}(?P<name>{underscored})(?![\w/-])", flag, message)
    return message


def require_run_dir(run_dir) -> None:
    """Raise ArtifactError for a directory that holds neither a config.json nor a model: not a
    damaged run directory but some other folder (io.load checks everything else)."""
    from flashsae import io
    from flashsae.errors import ArtifactError

    path = Path(run_dir)
    if path.is_dir() and not (path / io.CONFIG_FILE).exists() and not (path / io.MODEL_FILE).exists():
        raise ArtifactError(f"{path} is not a flashsae run directory (no {io.CONFIG_FILE}); "
                            "flashsae train and flashsae import write one")


def load_run(run_dir):
    """`io.load(run_dir)`, saying so when the directory is not a run directory at all."""
    from flashsae import io

    require_run_dir(run_dir)
    return io.load(run_dir)


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
