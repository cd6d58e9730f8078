"""`RunSpec`: the one place where flat keyword options (API, CLI, estimator) become typed configs.

Options arrive as one flat mapping (`k=32, lr=1e-3, standardize="none", model=..., hook=...`).
`RunSpec.from_options` splits them into the data, training, model and on-the-fly configs and
validates each, without editing the caller's mapping. `RunSpec.for_resume` rebuilds the spec a
checkpointed run was started with and refuses options that would change it. Imports config,
models, errors and the on-the-fly stream's config; never reads data.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flashsae import models
from flashsae.config import DataConfig, TrainConfig, to_dict
from flashsae.errors import ConfigError
from flashsae.lm.stream import STREAM_FIELDS, StreamConfig

ALIASES = {"latents": "d_sae", "arch": "architecture", "n_rows": "rows"}
DATA_FIELDS = frozenset(f.name for f in dataclasses.fields(DataConfig))
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
PASS_OPTIONS = ("seed", "batch_size", "device")
"""Training options that shape the data pass (split, shuffle, batch, device); every data option does too."""
RESUME_MAY_CHANGE = frozenset({"threads", "checkpoint_every", "tensor_parallel"})
"""Options a resumed run may set anew: none changes what the remaining steps compute (a different
tensor_parallel only how their sums round)."""


def canonical(options: Mapping) -> dict:
    """The options under their canonical names (`arch` -> `architecture`, `latents` -> `d_sae`)."""
    out: dict = {}
    for key, value in options.items():
        key = ALIASES.get(key, key)
        if key in out:
            raise ConfigError(f"option {key!r} given twice")
        out[key] = value
    return out


def model_fields(architecture: str) -> set[str]:
    return {f.name for f in dataclasses.fields(models.get(architecture).config_cls)}


def _appliers(name: str) -> list[str]:
    return [arch for arch in models.names() if name in model_fields(arch)]


@dataclass(frozen=True)
class RunSpec:
    """What one model's training run is: its architecture and typed configs.

    `model_options` are the architecture's config fields except `d_in`, which comes from the data
    (`model_config(d_in)` builds the config). `stream` is set when training on the fly.
    """

    architecture: str
    data: DataConfig
    train: TrainConfig
    model_options: dict = field(default_factory=dict)
    stream: StreamConfig | None = None

    @classmethod
    def from_options(cls, data, options: Mapping) -> RunSpec:
        """Split and validate `options` for training on `data` (array, path, name or None).

        Raises:
            ConfigError: an unknown option, one the architecture lacks, a value a config rejects,
                or DATA together with on-the-fly options.
        """
        opts = canonical(options)
        architecture = opts.pop("architecture", None) or models.DEFAULT
        models.get(architecture)  # validates the name
        stream_opts = {k: opts.pop(k) for k in list(opts) if k in STREAM_FIELDS}
        stream = None
        if stream_opts:
            if data is not None:
                raise ConfigError("give either DATA or --model/--hook/--text, not both")
            stream = StreamConfig(**stream_opts)
            opts["data"] = f"{stream.model}:{stream.hook}"
        elif data is not None:
            opts["data"] = str(data) if isinstance(data, (str, Path)) \
                else [str(p) for p in data] if _paths(data) else opts.get("data", "<array>")
        target = opts.get("target")
        if target is not None and not isinstance(target, (str, Path)) and not _paths(target):
            raise ConfigError("target takes a path (or one per layer); pass arrays as {'x': X, 'y': Y}")
        groups: dict[str, dict] = {"data": {}, "train": {}, "model": {}}
        own = model_fields(architecture)
        for key, value in opts.items():
            if key in DATA_FIELDS:
                groups["data"][key] = value
            elif key in TRAIN_FIELDS:
                groups["train"][key] = value
            elif key in own and key not in ("d_in", "d_out"):
                groups["model"][key] = value
            elif _appliers(key):
                raise ConfigError(f"option {key!r} applies to {', '.join(_appliers(key))}, "
                                  f"not to architecture {architecture!r}")
            else:
                raise ConfigError(f"unknown option {key!r}")
        return cls(architecture, DataConfig(**groups["data"]), TrainConfig(**groups["train"]), groups["model"], stream)

    @classmethod
    def for_resume(cls, data, saved: dict, options: Mapping) -> RunSpec:
        """The spec of the checkpointed run whose config.json is `saved`, with `options` checked against it.

        Raises:
            ConfigError: an option differs from the saved run (other than `RESUME_MAY_CHANGE`).
        """
        given = cls.from_options(data, options)
        model = {k: v for k, v in saved["model"].items() if k not in ("d_in", "d_out")}
        base = cls.from_options(None, {**saved["data"], **saved["train"], **model,
                                       "architecture": saved["architecture"]})
        explicit = canonical(options)
        diffs = []
        if given.architecture != base.architecture and "architecture" in explicit:
            diffs.append(f"architecture {given.architecture} (saved {base.architecture})")
        for group in ("data", "train"):
            mine, theirs = to_dict(getattr(given, group)), to_dict(getattr(base, group))
            diffs += [f"{k} {mine[k]!r} (saved {theirs[k]!r})" for k in mine
                      if k in explicit and k != "data" and k not in RESUME_MAY_CHANGE and mine[k] != theirs[k]]
        diffs += [f"{k} {v!r} (saved {model.get(k)!r})" for k, v in given.model_options.items()
                  if _plain(v) != _plain(model.get(k))]
        if diffs:
            raise ConfigError("cannot resume with options that differ from the saved run: " + ", ".join(diffs)
                              + "; drop them, or start a new run with --overwrite")
        train = dataclasses.replace(base.train, **{k: getattr(given.train, k) for k in RESUME_MAY_CHANGE
                                                   if k in explicit})
        if data is None:  # the saved data source
            return dataclasses.replace(base, train=train)
        return dataclasses.replace(base, train=train, data=dataclasses.replace(base.data, data=given.data.data))

    def model_config(self, d_in: int, n_train: int | None = None, d_out: int | None = None):
        """The architecture's config for `d_in` input columns, `n_train` training rows (for the
        default number of latents, `default_latents`) and, for a model that reconstructs another
        stream than it reads, that stream's width `d_out`."""
        cls = models.get(self.architecture).config_cls
        opts = {"d_in": d_in, **self.model_options}
        if d_out is not None and d_out != d_in:
            opts["d_out"] = d_out
        if opts.get("d_sae") is None:
            opts["d_sae"] = default_latents(d_in, n_train)
        try:
            return cls(**opts)
        except TypeError as e:
            raise ConfigError(str(e)) from None

    def pass_key(self) -> tuple:
        """Specs with equal keys read the data identically and can share one pass."""
        train = to_dict(self.train)
        return repr(sorted(to_dict(self.data).items())), tuple(train[k] for k in PASS_OPTIONS)


def default_latents(d_in: int, n_train: int | None = None) -> int:
    """Latents when none are asked for: 8 x the input width, fewer when the rows are few.

    Every latent should fire on enough training rows to learn its atom: with fewer than about
    eight rows per latent many die (digits, 1,617 rows x 64 columns: 35% dead with 512 latents,
    5% with 128, at about the same held-out FVU), so the default is capped at the largest power
    of two up to n_train / 8, and never below the input width.
    """
    latents = 8 * d_in
    if n_train is not None:
        per_rows = 1 << max(0, (n_train // 8).bit_length() - 1)
        latents = min(latents, max(d_in, per_rows))
    return latents


def _paths(value) -> bool:
    """Whether `value` is a list or tuple of paths (the layers of one row)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, (str, Path)) for v in value)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
