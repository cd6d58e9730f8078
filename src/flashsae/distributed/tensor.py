"""Latent (tensor) parallelism: the latents split over the ranks of a group, and its collectives.

A `LatentGroup` is this rank's view of its tensor-parallel group of T ranks: which contiguous slice
of the latents it holds (`range(n)`), and the few collectives a sharded SAE needs:

- `merge_topk`: each rank's top k candidates per row gathered and reduced to the global top k,
  the same selection as one process over all latents (ties aside);
- `merge_flat_topk`: the same over a whole batch (BatchTopK's k * batch largest);
- `sum_from_shards`: the decoder output, a sum over shards (one all-reduce of (batch, d_in)); its
  backward is the identity because every rank of the group computes the same loss;
- `into_shards`: the identity forward, and a sum over shards backward, for a replicated tensor
  (b_dec) that every shard's encoder reads.

`WHOLE` is the group of one rank: every collective returns its input. `split(comm, T)` builds the
two-dimensional layout (data x tensor) from torchrun's process group with `torch.distributed.new_group`.
Every collective counts the bytes it hands to the backend (`sent`), for the benchmark.

Imports only torch, `errors` and `distributed.comm`.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from flashsae.errors import ConfigError


class LatentGroup:
    """The tensor-parallel group of one rank: rank `rank` of `size`, on process group `group`."""

    def __init__(self, size: int = 1, rank: int = 0, group=None, call=None):
        self.size, self.rank, self.group = size, rank, group
        self._call = call or (lambda what, fn, *a, **kw: fn(*a, **kw))
        self.sent: Counter = Counter()  # bytes handed to each kind of collective on this rank

    def range(self, n: int) -> tuple[int, int]:
        """This rank's latents [start, stop) of `n` (contiguous, `size` must divide `n`)."""
        if n % self.size:
            raise ConfigError(f"tensor_parallel {self.size} does not divide the {n} latents; choose a number of "
                              f"latents that is a multiple of {self.size}")
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    # ---- collectives -------------------------------------------------------------------------
    def sum_(self, t: Tensor) -> Tensor:
        """Replace `t` in place by its sum over the group; returns `t`."""
        if self.size > 1:
            import torch.distributed as dist

            self.sent["all_reduce"] += t.numel() * t.element_size()
            self._call("tensor-parallel all_reduce", dist.all_reduce, t, group=self.group)
        return t

    def gather(self, t: Tensor, dim: int) -> Tensor:
        """Every rank's `t` (equal shapes) concatenated along `dim` in rank order."""
        if self.size == 1:
            return t
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.sent["all_gather"] += t.numel() * t.element_size()
        self._call("tensor-parallel all_gather", dist.all_gather, parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim)

    def sum_from_shards(self, t: Tensor) -> Tensor:
        """Sum of `t` over the group; the gradient passes back unchanged to every shard."""
        return t if self.size == 1 else _SumFromShards.apply(t, self)

    def into_shards(self, t: Tensor) -> Tensor:
        """`t` itself; its gradient is summed over the group (a replicated input of sharded work)."""
        return t if self.size == 1 else _IntoShards.apply(t, self)

    @torch.no_grad()
    def merge_topk(self, values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k largest of every rank's candidates per row: (values, global indices), each (rows, k).

        Args:
            values: (rows, c) this rank's candidates, the same c on every rank (pad with -inf).
            indices: (rows, c) their global latent ids (any value for a pad).
        """
        if self.size == 1:
            return values, indices
        all_values, all_indices = self.gather(values, 1), self.gather(indices, 1)
        top, pos = all_values.topk(min(k, all_values.shape[1]), dim=1)
        return top, all_indices.gather(1, pos)

    @torch.no_grad()
    def merge_flat_topk(self, values: Tensor, ids: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """The m largest of every rank's candidates, values (c,) with ids (c,): (values, ids), each (m,)."""
        if self.size == 1:
            return values, ids
        all_values, all_ids = self.gather(values, 0), self.gather(ids, 0)
        top, pos = all_values.topk(min(m, all_values.shape[0]))
        return top, all_ids[pos]


WHOLE = LatentGroup()


class _SumFromShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group: LatentGroup) -> Tensor:
        return group.sum_(t.clone())

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _IntoShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group: LatentGroup) -> Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.group.sum_(g.clone()), None


def split(comm, tensor_parallel: int):
    """`comm` (a whole torchrun world) as a data x tensor layout with `tensor_parallel` ranks per group.

    Ranks r = d * T + t for data index d and tensor index t: a tensor-parallel group is T consecutive
    ranks (one node's GPUs, where the per-step decoder all-reduce is cheapest), and a data-parallel
    group holds the ranks with the same t. Returns a Comm whose rank and world size (and gradient
    averages) are those of the data group and whose `tensor` is this rank's `LatentGroup`.

    Raises:
        ConfigError: `tensor_parallel` < 1 or not a divisor of the number of ranks.
    """
    world = comm.world_size
    if tensor_parallel < 1:
        raise ConfigError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
    if tensor_parallel == 1:
        return comm
    if world % tensor_parallel:
        raise ConfigError(f"tensor_parallel {tensor_parallel} does not divide the {world} ranks; launch a multiple of "
                          f"{tensor_parallel} ranks with torchrun (world = data x tensor)")
    import datetime

    import torch.distributed as dist

    from flashsae.distributed.comm import ProcessGroupComm

    rank, t_size = dist.get_rank(), tensor_parallel
    timeout = datetime.timedelta(seconds=comm.timeout_s)
    # Every rank creates every group, in the same order (torch.distributed's rule for new_group).
    tensor_groups = [dist.new_group(list(range(d * t_size, (d + 1) * t_size)), timeout=timeout)
                     for d in range(world // t_size)]
    data_groups = [dist.new_group(list(range(t, world, t_size)), timeout=timeout) for t in range(t_size)]
    out = ProcessGroupComm(comm.timeout_s, group=data_groups[rank % t_size])
    out.tensor = LatentGroup(t_size, rank % t_size, tensor_groups[rank // t_size], out.call)
    return out
