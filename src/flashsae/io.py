"""Run directories: save and load models, configs and metrics, atomically and versioned. No pickle.

A run directory holds model.safetensors, config.json (format_version, architecture, the model,
training and data configs exactly as they ran, preprocessing, data statistics, library version),
metrics.json, train_log.csv and plots. Every file is written to a temporary name and renamed; a
run is built in `<out>.partial` and renamed to `<out>` only when complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flashsae.config import to_dict
from flashsae.errors import ArtifactError, ConfigError

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "train_log.csv"
CURVES_FILE = "curves.png"
ATLAS_FILE = "atoms.png"
RECONSTRUCTIONS_FILE = "reconstructions.png"
JSONL_LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
REPORT_FILE = "report.html"
SWEEP_TABLE_FILE = "sweep.csv"
TRADEOFF_FILE = "tradeoff.png"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_TENSORS = "state.safetensors"

# Every top-level key train() writes to config.json; loading refuses any other (a foreign or
# tampered file). Add new keys here when train() starts writing them.
CONFIG_KEYS = frozenset({"format_version", "library", "library_version", "architecture", "model", "train", "data",
                         "preprocess", "data_stats", "resolved"})
# Sizes no real SAE reaches: a config.json beyond them is refused before anything is allocated.
MAX_DIM = 2**31
MAX_PARAMETERS = 2**34
MAX_JSON_BYTES = 64 * 2**20


def library_version() -> str:
    from flashsae import __version__

    return __version__


def run_config(architecture: str, model_cfg, *, train=None, data=None, preprocess: dict | None = None,
               data_stats: dict | None = None, resolved: dict | None = None) -> dict:
    """config.json, the one schema of a run directory (training and `flashsae import` both write it):
    exactly what ran (configs as dicts), the data's statistics and the defaults resolved at run time.

    `model_cfg`, `train` and `data` are config instances or plain dicts.
    """
    def as_dict(cfg):
        return cfg if cfg is None or isinstance(cfg, dict) else to_dict(cfg)

    return {
        "format_version": FORMAT_VERSION,
        "library": "flashsae",
        "library_version": library_version(),
        "architecture": architecture,
        "model": model_cfg if isinstance(model_cfg, dict) else model_cfg.to_dict(),
        "train": as_dict(train),
        "data": as_dict(data),
        "preprocess": preprocess or {"mode": "none"},
        "data_stats": data_stats or {},
        "resolved": resolved or {},
    }


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def is_finished(out: str | os.PathLike) -> bool:
    """Whether `out` holds a complete run (its model is written and no `<out>.partial` is left)."""
    out = Path(out)
    return (out / MODEL_FILE).is_file() and not partial_dir(out).exists()


def is_resumable(out: str | os.PathLike) -> bool:
    """Whether `<out>.partial` holds a checkpoint that `resume` can continue."""
    return (partial_dir(Path(out)) / CHECKPOINT_DIR / CHECKPOINT_STATE).is_file()


def prepare_out(out: str | os.PathLike, *, overwrite: bool, resume: bool, create: bool = True) -> Path:
    """Validate the output directory and return the in-progress directory to write into.

    create: False on the ranks of a data-parallel run that do not write (all but rank 0): check
        the directory and return its path, but leave the disk alone.
    """
    out = Path(out)
    if out.exists() and not overwrite and not resume:
        raise ConfigError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    work = partial_dir(out)
    if resume:
        if not is_resumable(out):
            if is_finished(out):
                raise ConfigError(f"nothing to resume: {out} is already finished")
            raise ConfigError(f"nothing to resume: no checkpoint in {work}")
        return work
    if not create:
        return work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def finalize(work: Path, out: str | os.PathLike) -> Path:
    """Atomically publish the finished run: `<out>.partial` becomes `<out>`.

    The checkpoint is removed only after the rename, so a crash at any point leaves either a
    resumable `<out>.partial` or a complete `<out>`.
    """
    out = Path(out)
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
    os.replace(work, out)
    _fsync_dir(out.parent)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False, suffix: str = "", mode: int = 0o666):
    """Yield a temporary sibling of `path` to write; it replaces `path` only once complete.

    Every file the package writes goes through here. A crash leaves the previous `path` or the new
    one, never a mix; an exception removes the temporary file. The temporary name is
    `.NAME.tmp-PID` plus `suffix` (for writers that insist on an extension, like np.save), so
    leftovers of a killed process are recognisable. `durable` also flushes the file and its
    directory to disk (power loss). A full disk raises ArtifactError and keeps the previous `path`.
    The file gets `mode` less the umask (0666: the usual permissions), whatever the writer created
    it with.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.chmod(tmp, mode & ~_umask())
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArtifactError(f"no space left on device while writing {path}; "
                                "the previous version, if any, is kept") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", durable=True)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path, durable=True) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:  # its I/O errors arrive as text, e.g. "IoError(Os { code: 28, ...})"
            if f"code: {errno.ENOSPC}," in str(e) or "No space left" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from None
            raise


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ArtifactError(f"{path} is corrupt: {path.stat().st_size:,} bytes is too large for a JSON file")
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError covers JSONDecodeError
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
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


def save_model(run_dir: Path, model, config: dict) -> None:
    run_dir = Path(run_dir)
    write_tensors(run_dir / MODEL_FILE, model.state_dict(), {"format": "flashsae", "architecture": model.architecture})
    write_json(run_dir / CONFIG_FILE, config)


def inside(run_dir: str | os.PathLike, name: str) -> Path:
    """`run_dir / name`, refusing a path (a symlink, or '..') that leads outside `run_dir`."""
    run_dir = Path(run_dir)
    path = run_dir / name
    root, target = run_dir.resolve(), path.resolve()
    if target != root and root not in target.parents:
        raise ArtifactError(f"{path} points outside its directory (to {target}); refusing to read it")
    return path


def read_config(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory {run_dir} does not exist")
    path = inside(run_dir, CONFIG_FILE)
    cfg = read_json(path)
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {version!r}; this flashsae reads version {FORMAT_VERSION}")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise ArtifactError(f"{path} has unknown key {unknown[0]!r}; it was not written by this flashsae")
    for key, kind in (("architecture", str), ("model", dict), ("preprocess", dict)):
        if key not in cfg:
            raise ArtifactError(f"{path} is corrupt: missing {key!r}")
        if not isinstance(cfg[key], kind):
            raise ArtifactError(f"{path} is corrupt: {key!r} must be a JSON {'string' if kind is str else 'object'}")
    return cfg


def build_model(cfg: dict):
    """Construct the model described by a config.json dictionary (weights not loaded)."""
    from flashsae import models
    from flashsae.preprocess import Standardizer

    try:
        cls = models.get(cfg["architecture"])
    except (ConfigError, TypeError) as e:
        raise ArtifactError(f"config.json describes an invalid model: {e}") from None
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(cfg["model"]) - fields)
    if unknown:
        raise ArtifactError(f"config.json has unknown model option {unknown[0]!r} for architecture "
                            f"{cfg['architecture']!r}")
    try:
        model_cfg = cls.config_cls(**cfg["model"])
    except (ConfigError, TypeError, ValueError, OverflowError) as e:
        raise ArtifactError(f"config.json describes an invalid model: {e}") from None
    _check_size(model_cfg)
    try:
        std = Standardizer(model_cfg.d_in, cfg["preprocess"].get("mode", "none"))
    except (ConfigError, TypeError) as e:
        raise ArtifactError(f"config.json has an invalid preprocess entry: {e}") from None
    return cls(model_cfg, std)


def _check_size(model_cfg) -> None:
    """Refuse dimensions no real SAE has, before any tensor is allocated."""
    dims = {"d_in": model_cfg.d_in, "d_sae": model_cfg.d_sae}
    dims.update({f"encoder_hidden[{i}]": h for i, h in enumerate(model_cfg.encoder_hidden)})
    dims.update({f"decoder_hidden[{i}]": h for i, h in enumerate(model_cfg.decoder_hidden)})
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIM:
            raise ArtifactError(f"config.json describes an invalid model: {name} = {value!r} "
                                f"(must be an integer in [1, {MAX_DIM}])")
    enc = [model_cfg.d_in, *model_cfg.encoder_hidden]
    dec = [*model_cfg.decoder_hidden, model_cfg.d_in]
    n = sum(a * b + b for a, b in zip(enc[:-1], enc[1:])) + sum(a * b + b for a, b in zip(dec[:-1], dec[1:]))
    n += model_cfg.d_sae * (enc[-1] + dec[0] + 2) + model_cfg.d_in
    if n > MAX_PARAMETERS:
        raise ArtifactError(f"config.json describes a model with {n:,} parameters (d_in {model_cfg.d_in}, "
                            f"d_sae {model_cfg.d_sae}), more than flashsae loads ({MAX_PARAMETERS:,}); "
                            "the file is corrupt or not from flashsae")


def load(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Load a trained model from a run directory (or a checkpoint directory of one)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    path = inside(run_dir, MODEL_FILE)
    # Compare the shapes config.json implies with those stored in the file before allocating
    # anything: a damaged config cannot make us allocate more than the file itself holds.
    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    _check_stored_shapes(expected, _stored_shapes(path), path)
    model = build_model(cfg)
    tensors = read_tensors(path)
    load_weights(model, tensors, path)
    model.run_config = cfg
    return model.to(device).eval()


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    from safetensors import safe_open

    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None


def _check_stored_shapes(expected: dict[str, torch.Tensor], stored: dict[str, tuple], where: Path) -> None:
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ArtifactError(f"{where} is corrupt: missing tensors {', '.join(missing[:5])}")
    for name, ref in expected.items():
        if stored[name] != tuple(ref.shape):
            raise ArtifactError(f"{where} is corrupt: {name} has shape {stored[name]}, "
                                f"config.json implies {tuple(ref.shape)}")


def load_weights(model, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ArtifactError(f"{where} is corrupt: missing tensors {', '.join(missing[:5])}")
    for name, ref in expected.items():
        if tensors[name].shape != ref.shape:
            raise ArtifactError(f"{where} is corrupt: {name} has shape {tuple(tensors[name].shape)}, "
                                f"config.json implies {tuple(ref.shape)}")
        if ref.is_floating_point() and not tensors[name].is_floating_point():
            raise ArtifactError(f"{where} is corrupt: {name} has dtype {tensors[name].dtype}, expected floating point")
    model.load_state_dict({k: tensors[k] for k in expected}, strict=True)
