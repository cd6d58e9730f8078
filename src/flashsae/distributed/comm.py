"""Process groups from torchrun's environment and collectives that are no-ops in a single process.

A training job holds one `Comm`. `LOCAL` is rank 0 of 1: every collective returns its input
unchanged and costs nothing, so the trainer and the training loop call them unconditionally.
`from_env()` returns `LOCAL` unless torchrun started several processes (WORLD_SIZE > 1); then it
joins the process group (NCCL for CUDA tensors, gloo for CPU tensors) with a timeout and returns a
`ProcessGroupComm`, whose collectives turn a failure (a rank that died, or one stuck for longer
than the timeout) into a `DistributedError` naming this rank, instead of waiting forever.

Imports only torch and `errors`.
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import os
from collections.abc import Iterable

import torch
from torch import Tensor

from flashsae.distributed.tensor import WHOLE, LatentGroup
from flashsae.errors import ConfigError, DataError, DistributedError

DEFAULT_TIMEOUT_S = 60.0


class Comm:
    """A single process: rank 0 of 1, and every collective returns its input unchanged."""

    rank = 0
    world_size = 1
    local_rank = 0
    tensor: LatentGroup = WHOLE  # the ranks this one shares its latents with (tensor parallel)

    def is_main(self) -> bool:
        """True on the rank that writes files, prints and shows progress bars (rank 0)."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: `device`, pinned to this rank's GPU when several share a node."""
        return device

    def all_reduce_mean_(self, t: Tensor) -> Tensor:
        """Replace `t` in place by its mean over ranks; returns `t`."""
        return t

    def any_(self, mask: Tensor) -> Tensor:
        """Elementwise logical or of a bool tensor over ranks (a new tensor)."""
        return mask

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        """Overwrite `t` in place with rank `src`'s `t`; returns `t`."""
        return t

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def all_reduce_grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of `params` over ranks (parameters without a gradient are skipped)."""

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers into `module` on every rank."""

    def agree_stop(self, stop: bool, *, sync_point: bool) -> bool:
        """Whether to stop now: any rank asked to stop. Ranks compare flags only at sync points."""
        return stop

    def check_same(self, what: str, value: str) -> None:
        """Raise DataError unless `value` (a description of `what`) is the same on every rank."""


LOCAL = Comm()


class ProcessGroupComm(Comm):
    """One rank of a torch.distributed process group (initialised by `from_env`).

    `group`: the data-parallel ranks, when they are not the whole world (`tensor.split`): `rank`,
    `world_size`, gradient averages and firing masks are then the data group's, while the stop
    agreement, broadcasts, barriers and `is_main` (global rank 0) span every rank.
    """

    def __init__(self, timeout_s: float, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.global_rank = dist.get_rank()
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.timeout_s = timeout_s

    def is_main(self) -> bool:
        return self.global_rank == 0

    def call(self, what: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, a collective: a failure becomes a DistributedError naming this rank."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo's "Connection closed by peer"
            _STATE["broken"] = True
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {self.global_rank} lost contact with the process group during {what} (another rank exited or "
                f"did not answer within {self.timeout_s:g} s; see its log, or raise --dist-timeout): {detail}"
            ) from None

    def device(self, device: torch.device) -> torch.device:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def all_reduce_mean_(self, t: Tensor) -> Tensor:
        # SUM then divide: ReduceOp.AVG exists for NCCL only.
        self.call("all_reduce", self._dist.all_reduce, t, group=self.group)
        return t.div_(self.world_size)

    def any_(self, mask: Tensor) -> Tensor:
        flags = mask.to(torch.uint8)
        self.call("all_reduce", self._dist.all_reduce, flags, op=self._dist.ReduceOp.MAX, group=self.group)
        return flags.bool()

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        self.call("broadcast", self._dist.broadcast, t, src)
        return t

    def barrier(self) -> None:
        self.call("barrier", self._dist.barrier)

    def all_reduce_grads_(self, params) -> None:
        # Which parameters have a gradient depends on the model and the AuxK switch, both the same on
        # every rank, never on the data; a parameter without one is skipped by the optimizer too.
        grads = [p.grad for p in params if p.grad is not None]
        # One asynchronous all-reduce per tensor (a handful per SAE), all in flight at once.
        works = [self.call("gradient all_reduce", self._dist.all_reduce, g, async_op=True,
                            group=self.group) for g in grads]
        for w in works:
            self.call("gradient all_reduce", w.wait)
        for g in grads:
            g.div_(self.world_size)

    @torch.no_grad()
    def broadcast_module_(self, module: torch.nn.Module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self.broadcast_(t.data, 0)

    def agree_stop(self, stop: bool, *, sync_point: bool) -> bool:
        if not sync_point:
            return False
        flag = torch.tensor([stop], dtype=torch.uint8)  # over every rank, not only the data group
        self.call("all_reduce", self._dist.all_reduce, flag, op=self._dist.ReduceOp.MAX)
        return bool(flag.item())

    def check_same(self, what: str, value: str) -> None:
        mine = torch.frombuffer(bytearray(hashlib.sha256(value.encode()).digest()), dtype=torch.uint8)
        ref = self.broadcast_(mine.clone(), 0)
        if not torch.equal(ref, mine):
            raise DataError(f"rank {self.global_rank} sees different {what} than rank 0 ({value}); every rank "
                            "must read the same data (a shared file system, or identical copies)")


# "broken": a collective failed, so the group is left to the OS at exit (destroying it could block).
_STATE = {"broken": False, "timeout_s": DEFAULT_TIMEOUT_S}


def from_env(timeout_s: float = DEFAULT_TIMEOUT_S, *, gpu_collectives: bool = True) -> Comm:
    """The Comm of this process: LOCAL, or a process group joined from torchrun's environment.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; WORLD_SIZE > 1
    means data-parallel training. An already initialised default process group is reused.

    Args:
        timeout_s: how long a collective (and joining the group) may wait for the other ranks.
        gpu_collectives: False joins with gloo only, for ranks that exchange nothing but a few
            CPU values (sweeps): a dead peer is then noticed at once, however long the timeout.

    Raises:
        ConfigError: a bad timeout or an environment that cannot form a process group.
        DistributedError: the other ranks did not join within the timeout.
    """
    if not timeout_s > 0:
        raise ConfigError(f"dist_timeout must be > 0 seconds, got {timeout_s}")
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    import torch.distributed as dist

    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return LOCAL
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
        nccl = gpu_collectives and torch.cuda.is_available() and dist.is_nccl_available()
        backend = "cpu:gloo,cuda:nccl" if nccl else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"rank {os.environ['RANK']} could not join the process group at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']} within {timeout_s:g} s: {detail}") from None
        _STATE["timeout_s"] = timeout_s
        atexit.register(_shutdown)
    return ProcessGroupComm(timeout_s)


def current() -> Comm:
    """The default process group as a Comm when one is initialised, else LOCAL."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return ProcessGroupComm(_STATE["timeout_s"])
    return LOCAL


def _shutdown() -> None:
    import torch.distributed as dist

    if not _STATE["broken"] and dist.is_initialized():
        dist.destroy_process_group()
