"""Map flat keyword options (API, CLI, estimator) onto DataConfig, TrainConfig and the model config."""
from __future__ import annotations

import dataclasses

from flashsae import models
from flashsae.config import DataConfig, TrainConfig
from flashsae.errors import ConfigError

ALIASES = {"latents": "d_sae", "arch": "architecture", "n_rows": "rows"}
DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def model_fields(architecture: str) -> set[str]:
    return {f.name for f in dataclasses.fields(models.get(architecture).config_cls)}


def all_model_fields() -> dict[str, list[str]]:
    """Every model option and the architectures it applies to."""
    out: dict[str, list[str]] = {}
    for name in models.names():
        for f in model_fields(name):
            out.setdefault(f, []).append(name)
    return out


def split_options(options: dict) -> tuple[str, dict, dict, dict]:
    """Return (architecture, data options, train options, model options); unknown names are errors."""
    opts = {}
    for key, value in options.items():
        key = ALIASES.get(key, key)
        if key in opts:
            raise ConfigError(f"option {key!r} given twice")
        opts[key] = value
    architecture = opts.pop("architecture", None) or "topk"
    models.get(architecture)  # validates the name
    data, train, model = {}, {}, {}
    valid_model = model_fields(architecture)
    known_model = all_model_fields()
    for key, value in opts.items():
        if key in DATA_FIELDS:
            data[key] = value
        elif key in TRAIN_FIELDS:
            train[key] = value
        elif key in valid_model:
            model[key] = value
        elif key in known_model:
            raise ConfigError(f"option {key!r} applies to {', '.join(sorted(known_model[key]))}, "
                              f"not to architecture {architecture!r}")
        else:
            raise ConfigError(f"unknown option {key!r}")
    return architecture, data, train, model


def make_model_config(architecture: str, model_opts: dict, d_in: int):
    cls = models.get(architecture).config_cls
    opts = dict(model_opts)
    opts["d_in"] = d_in
    if opts.get("d_sae") is None:
        opts["d_sae"] = 8 * d_in
    try:
        return cls(**opts)
    except TypeError as e:
        raise ConfigError(str(e)) from None
