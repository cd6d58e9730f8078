"""Run directories: save and load models, configs and metrics, atomically and versioned. No pickle.

A run directory holds model.safetensors, config.json (format_version, architecture, the model,
training and data configs exactly as they ran, preprocessing, data statistics, library version),
metrics.json, train_log.csv and plots. Every file is written to a temporary name and renamed; a
run is built in `<out>.partial` and renamed to `<out>` only when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flashsae.errors import ArtifactError, ConfigError

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "train_log.csv"
CURVES_FILE = "curves.png"
ATLAS_FILE = "atoms.png"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_TENSORS = "state.safetensors"


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def prepare_out(out: str | os.PathLike, *, overwrite: bool, resume: bool) -> Path:
    """Validate the output directory and return the in-progress directory to write into."""
    out = Path(out)
    if out.exists() and not overwrite and not resume:
        raise ConfigError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    work = partial_dir(out)
    if resume:
        if not (work / CHECKPOINT_DIR / CHECKPOINT_STATE).is_file():
            raise ConfigError(f"nothing to resume: no checkpoint in {work}")
        return work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def finalize(work: Path, out: str | os.PathLike) -> Path:
    """Atomically publish the finished run: `<out>.partial` becomes `<out>`."""
    out = Path(out)
    shutil.rmtree(work / CHECKPOINT_DIR, ignore_errors=True)
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def _atomic_path(path: Path):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj) -> None:
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with _atomic_path(Path(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} is corrupt: expected a JSON object")
    return obj


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None


def model_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def save_model(run_dir: Path, model, config: dict) -> None:
    run_dir = Path(run_dir)
    write_tensors(run_dir / MODEL_FILE, model_tensors(model), {"format": "flashsae", "architecture": model.architecture})
    write_json(run_dir / CONFIG_FILE, config)


def read_config(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory {run_dir} does not exist")
    cfg = read_json(run_dir / CONFIG_FILE)
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{run_dir / CONFIG_FILE} has format_version {version!r}; this flashsae reads version {FORMAT_VERSION}")
    for key in ("architecture", "model", "preprocess"):
        if key not in cfg:
            raise ArtifactError(f"{run_dir / CONFIG_FILE} is corrupt: missing {key!r}")
    return cfg


def build_model(cfg: dict):
    """Construct the model described by a config.json dictionary (weights not loaded)."""
    from flashsae import models
    from flashsae.preprocess import Standardizer

    try:
        cls = models.get(cfg["architecture"])
        model_cfg = cls.config_cls(**cfg["model"])
    except (ConfigError, TypeError) as e:
        raise ArtifactError(f"config.json describes an invalid model: {e}") from None
    std = Standardizer(model_cfg.d_in, cfg["preprocess"].get("mode", "none"))
    return cls(model_cfg, std)


def load(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Load a trained model from a run directory (or a checkpoint directory of one)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model = build_model(cfg)
    tensors = read_tensors(run_dir / MODEL_FILE)
    load_weights(model, tensors, run_dir / MODEL_FILE)
    model.run_config = cfg
    return model.to(device).eval()


def load_weights(model, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ArtifactError(f"{where} is corrupt: missing tensors {', '.join(missing[:5])}")
    for name, ref in expected.items():
        if tensors[name].shape != ref.shape:
            raise ArtifactError(f"{where} is corrupt: {name} has shape {tuple(tensors[name].shape)}, "
                                f"config.json implies {tuple(ref.shape)}")
    model.load_state_dict({k: tensors[k] for k in expected}, strict=True)
