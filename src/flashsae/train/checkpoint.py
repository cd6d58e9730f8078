"""Checkpoints for --resume, and the data fingerprint that makes sure a resume reads the same rows.

A checkpoint is `<out>.partial/checkpoint/`: `state-<step>.safetensors` (weights, optimizer
moments, dead-latent counters, the AuxK switch, the torch RNG) and `state.json` (the run's
`LoopState`: step, rows seen, log history, early-stopping state; and the name of its tensor
file). The tensors are written first under a step-stamped name, then the JSON that points at
them, then older tensor files are removed; every write goes to a temporary name and is renamed.
A crash at any moment (SIGKILL, power loss, full disk) therefore leaves the previous checkpoint
or the new one, never a mix.
The data position needs no storage: the batch plan is a pure function of (seed, epoch), so the
step alone says where to continue.

Imports io, errors and torch; never imports the training loop.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flashsae import io
from flashsae.errors import ArtifactError, DataError

FINGERPRINT_ROWS = 16  # rows hashed at each end of the data


@dataclass
class LoopState:
    """Where a run is: written into every checkpoint and read back by a resume."""

    step: int = 0
    rows_seen: int = 0
    history: list[dict] = field(default_factory=list)  # the log rows so far
    best: float = math.inf         # best held-out FVU (standardised), for early stopping
    since_best: int = 0            # evaluations since it improved
    elapsed: float = 0.0           # training seconds (evaluations excluded)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


def fingerprint(source) -> str:
    """A cheap identity of the data: shape plus a hash of its first and last rows (16 hex digits)."""
    h = hashlib.sha256(f"{source.n_rows}x{source.d_in}".encode())
    n = min(FINGERPRINT_ROWS, source.n_rows)
    for start, stop in ((0, n), (source.n_rows - n, source.n_rows)):
        h.update(np.ascontiguousarray(source.read(start, stop), dtype="<f4").tobytes())
    return h.hexdigest()[:16]


def describe(source, fp: str) -> str:
    return f"{source.n_rows} rows x {source.d_in} columns, fingerprint {fp}"


def check_same_data(saved_config: dict, source, fp: str, where: Path) -> None:
    """Raise DataError unless `source` is the data the checkpoint in `where` was trained on."""
    stats = saved_config.get("data_stats") or {}
    n_rows, d_in, saved_fp = stats.get("n_rows"), stats.get("d_in"), stats.get("fingerprint")
    if (n_rows, d_in) != (source.n_rows, source.d_in):
        raise DataError(f"cannot resume: {source.name} has {source.n_rows} rows x {source.d_in} columns but the "
                        f"checkpoint in {where} was trained on {n_rows} rows x {d_in} columns of "
                        f"{stats.get('source')}; resume with the same data")
    if saved_fp is not None and saved_fp != fp:
        raise DataError(f"cannot resume: {source.name} has the same shape as the data the checkpoint in {where} "
                        f"was trained on ({stats.get('source')}) but different rows (fingerprint {fp}, "
                        f"checkpoint {saved_fp}); resume with the same data")


def save(work: Path, model, trainer, state: LoopState) -> None:
    """Write a checkpoint of `model`, `trainer` and the loop `state` into `work/checkpoint`."""
    ckpt = io.inside(work, io.CHECKPOINT_DIR)
    ckpt.mkdir(exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(trainer.state_tensors())
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"state-{state.step}.safetensors"
    io.write_tensors(ckpt / name, tensors)
    io.write_json(ckpt / io.CHECKPOINT_STATE, {**state.to_json(), "tensors": name})
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    for tmp in ckpt.glob(".*.tmp-*"):  # left by a process killed mid-write
        tmp.unlink(missing_ok=True)


def load(work: Path, model, trainer) -> LoopState:
    """Restore `model` and `trainer` from `work/checkpoint`; return the loop state."""
    ckpt = io.inside(work, io.CHECKPOINT_DIR)
    state = io.read_json(io.inside(ckpt, io.CHECKPOINT_STATE))
    name = state.pop("tensors", None)
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ArtifactError(f"{ckpt / io.CHECKPOINT_STATE} is corrupt: bad tensor file name {name!r}")
    path = io.inside(ckpt, name)
    tensors = io.read_tensors(path)
    io.load_weights(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    try:
        trainer.load_state_tensors(tensors, int(state["step"]))
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    return LoopState.from_json(state)
