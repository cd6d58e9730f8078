"""Training under torchrun: a process group from the environment, data parallelism (`comm`) and
latent sharding (`tensor`), with collectives that are no-ops in a single process, so the same
code runs alone and on N ranks.

Imports only torch and `errors`; see docs/distributed.md for launching and costs.
"""
from __future__ import annotations

from torch import Tensor

from flashsae.distributed.comm import DEFAULT_TIMEOUT_S, LOCAL, Comm, ProcessGroupComm, current, from_env
from flashsae.distributed.tensor import WHOLE, LatentGroup, split


def is_main() -> bool:
    """True unless this process is a rank other than 0 of an initialised process group."""
    return current().is_main()


def rank() -> int:
    return current().rank


def world_size() -> int:
    return current().world_size


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average `t` over ranks in place (no-op in a single process); returns `t`."""
    return current().all_reduce_mean_(t)


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Copy rank `src`'s `t` into `t` on every rank (no-op in a single process); returns `t`."""
    return current().broadcast_(t, src)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    current().barrier()


__all__ = ["DEFAULT_TIMEOUT_S", "LOCAL", "WHOLE", "Comm", "LatentGroup", "ProcessGroupComm", "all_reduce_mean_",
           "barrier", "broadcast_", "current", "from_env", "is_main", "rank", "split", "world_size"]
