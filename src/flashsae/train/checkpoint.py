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

With the latents sharded over T ranks (tensor parallel) every rank of the first data-parallel
replica writes its own `state-<step>-shard-<t>-of-<T>.safetensors` (its rows of the per-latent
tensors, moments and dead-latent counters, plus the replicated ones); once every rank has written
(a barrier), rank 0 writes `state.json` listing the files, so the index never names a missing
shard. `load` assembles any rank's rows from any layout: a run saved with T ranks resumes with
another T, or in one process.

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

from flashsae import distributed, io
from flashsae.errors import ArtifactError, DataError
from flashsae.models.sharded import ShardedSAE, latent_names

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


def save(work: Path, model, trainer, state: LoopState, comm: distributed.Comm = distributed.LOCAL) -> None:
    """Write a checkpoint of `model`, `trainer` and the loop `state` into `work/checkpoint`.

    Whole models: called by rank 0 alone. Sharded (`comm.tensor.size` > 1): called by every rank.
    """
    ckpt = io.inside(work, io.CHECKPOINT_DIR)
    group = comm.tensor
    names = [f"state-{state.step}.safetensors"] if group.size == 1 else \
        [f"state-{state.step}-shard-{t}-of-{group.size}.safetensors" for t in range(group.size)]
    if comm.rank == 0:  # the first data-parallel replica holds every shard once
        ckpt.mkdir(exist_ok=True)
        tensors = {f"model.{k}": v for k, v in _whole(model).state_dict().items()}
        tensors.update(trainer.state_tensors())
        tensors["rng.torch"] = torch.get_rng_state()
        io.write_tensors(ckpt / names[group.rank], tensors)
    if group.size > 1:
        comm.barrier()  # every shard is on disk before the index names it
    if comm.is_main():
        index = {"tensors": names[0]} if group.size == 1 else {"shards": names, "latents": _whole(model).cfg.d_sae}
        io.write_json(ckpt / io.CHECKPOINT_STATE, {**state.to_json(), **index})
        for old in ckpt.glob("state-*.safetensors"):
            if old.name not in names:
                old.unlink(missing_ok=True)
        for tmp in ckpt.glob(".*.tmp-*"):  # left by a process killed mid-write
            tmp.unlink(missing_ok=True)
    if group.size > 1:
        # No rank starts writing its next shard while the main rank still removes the files this
        # checkpoint replaced (on a loaded machine it did, and lost the new shard).
        comm.barrier()


def load(work: Path, model, trainer) -> LoopState:
    """Restore `model` (whole, or one rank's `ShardedSAE`) and `trainer` from `work/checkpoint`;
    return the loop state. The checkpoint may have been written with any number of shards."""
    ckpt = io.inside(work, io.CHECKPOINT_DIR)
    state = io.read_json(io.inside(ckpt, io.CHECKPOINT_STATE))
    names = state.pop("shards", None)
    if names is None:
        names = [state.pop("tensors", None)]
    for name in names if isinstance(names, list) and names else [None]:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ArtifactError(f"{ckpt / io.CHECKPOINT_STATE} is corrupt: bad tensor file name {name!r}")
    state.pop("latents", None)
    path = io.inside(ckpt, names[0])
    whole = _whole(model)
    start, stop = (model.start, model.stop) if isinstance(model, ShardedSAE) else (0, whole.cfg.d_sae)
    tensors, exact = _rows(ckpt, names, _sharded_keys(whole, trainer), whole.cfg.d_sae, start, stop)
    if not exact:  # a different layout: the AuxK candidate count is this shard's own, counted anew
        tensors.pop("trainer.n_dead", None)
        tensors.pop("trainer.n_dead_anywhere", None)
    io.load_weights(whole, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    try:
        trainer.load_state_tensors(tensors, int(state["step"]))
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"{path} is corrupt: {e}") from None
    if not exact:
        trainer.refresh_aux()
    return LoopState.from_json(state)


def _whole(model):
    """The architecture's module: the model itself, or the one a `ShardedSAE` slices."""
    return model.inner if isinstance(model, ShardedSAE) else model


def _sharded_keys(model, trainer) -> set[str]:
    """Checkpoint keys whose first dimension runs over the latents."""
    latent = set(latent_names(model))
    keys = {f"model.{n}" for n in latent} | {"trainer.rows_since_fired"}
    for i, (name, _) in enumerate(model.named_parameters()):
        if name in latent:
            keys |= {f"optimizer.{i}.{stat}" for stat in ("exp_avg", "exp_avg_sq", "momentum_buffer", "z", "y")}
    return keys


def _rows(ckpt: Path, names: list[str], sharded: set[str], n: int, start: int, stop: int) -> tuple[dict, bool]:
    """Latents [start, stop) of the tensors in `names` (file t of T holds the t-th T-th of the `n`
    latents), with the other tensors from the first file read; and whether one file held exactly them."""
    per = n // len(names)
    if per * len(names) != n:
        raise ArtifactError(f"{ckpt / io.CHECKPOINT_STATE} is corrupt: {len(names)} shards of {n} latents")
    parts: list[dict] = []
    for t, name in enumerate(names):
        a, b = t * per, (t + 1) * per
        if a < stop and b > start:
            parts.append({k: (v[max(a, start) - a:min(b, stop) - a] if k in sharded and v.ndim else v)
                          for k, v in io.read_tensors(io.inside(ckpt, name)).items()})
    out = dict(parts[0])
    for key in out.keys() & sharded:
        if out[key].ndim:
            out[key] = torch.cat([p[key] for p in parts])
    return out, len(parts) == 1 and per == stop - start
