"""One rank's slice of a model's latents under tensor parallelism, and its forward pass.

`ShardedSAE(model, group)` keeps rows [start, stop) of the latents (`W_enc`, `b_enc`, `W_dec` and
any other per-latent parameter, such as JumpReLU's thresholds); `b_dec` and buffers stay whole on
every rank. The encoder product is local. The code layer follows the architecture's
`latent_sharding` (declared on the class itself, not inherited, so a subclass with its own forward
must opt in):

- "elementwise": the activation acts on each latent alone (ReLU + L1, JumpReLU), so it runs on the
  local pre-activations and the penalty, a sum over latents, is summed over the group;
- "topk": each shard's k largest pre-activations per row are merged into the global top k;
- "batchtopk": the same over the whole batch (the k * batch largest), and the threshold from the
  merged selection.

The decoder output is a sum over shards (`LatentGroup.sum_from_shards`); `b_dec` enters every
shard's encoder through `into_shards`, so its gradient sums the shards' contributions. AuxK picks
each shard's k_aux stalest-dead candidates and merges them like TopK. Codes, dead-latent counters
and the decoder normalisation are per shard: `codes` hold local latent ids, `d_sae` is the shard's
count. Imports models.base, kernels and distributed.tensor.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from flashsae import kernels
from flashsae.distributed.tensor import LatentGroup
from flashsae.errors import ConfigError
from flashsae.kernels import auxk, cpu_topk
from flashsae.models.base import ForwardOutput, SparseAutoencoder, SparseCodes

REPLICATED = frozenset({"b_dec"})  # parameters every shard holds whole


def sharding_of(cls: type) -> str | None:
    """How `cls` shards its latents ("elementwise", "topk", "batchtopk"), or None when it cannot."""
    return cls.__dict__.get("latent_sharding")


def check(cls: type, cfg, tensor_parallel: int) -> None:
    """Raise ConfigError unless a model of `cls` with `cfg` can be split over `tensor_parallel` ranks."""
    if tensor_parallel == 1:
        return
    if sharding_of(cls) is None:
        from flashsae import models

        ok = [n for n in models.names() if sharding_of(models.get(n))]
        raise ConfigError(f"architecture {cls.architecture!r} cannot be sharded across ranks; tensor_parallel works "
                          f"with {', '.join(ok)}")
    if cfg.encoder_hidden or cfg.decoder_hidden:
        raise ConfigError("tensor_parallel needs a one-layer encoder and decoder: hidden layers (encoder_hidden, "
                          "decoder_hidden) mix every latent")
    LatentGroup(tensor_parallel).range(cfg.d_sae)


def latent_names(model: SparseAutoencoder) -> list[str]:
    """The model's own parameters indexed by latent in their first dimension (sliced by a shard)."""
    return [name for name, p in model.named_parameters(recurse=False)
            if name not in REPLICATED and p.ndim >= 1 and p.shape[0] == model.cfg.d_sae]


class ShardedSAE(nn.Module):
    """Rows [start, stop) of `model`'s latents (sliced in place), on rank `group.rank` of `group`."""

    def __init__(self, model: SparseAutoencoder, group: LatentGroup):
        super().__init__()
        check(type(model), model.cfg, group.size)
        self.inner = model
        self.group = group
        self.kind = sharding_of(type(model))
        self.start, self.stop = group.range(model.cfg.d_sae)
        self.sharded_names = latent_names(model)
        with torch.no_grad():
            for name in self.sharded_names:
                setattr(model, name, nn.Parameter(getattr(model, name)[self.start:self.stop].clone()))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    @property
    def d_sae(self) -> int:
        """Latents held by this rank."""
        return self.stop - self.start

    def forward(self, x: Tensor, *, aux_mask=None) -> ForwardOutput:
        m, g = self.inner, self.group
        pre = nn.functional.linear(x - g.into_shards(m.b_dec), m.W_enc, m.b_enc)  # (batch, d_sae / T)
        penalty = x.new_zeros(())
        if self.kind == "topk":
            codes = self._merged(pre, *self._top(pre, m.cfg.k), m.cfg.k)
            y = kernels.sparse_decode(codes.values, codes.indices, m.W_dec)
        elif self.kind == "batchtopk":
            codes = self._batch_topk(pre) if self.training else torch.relu(pre) * (torch.relu(pre) > m.threshold)
            y = codes @ m.W_dec
        else:
            codes, penalty = m.activate(pre)
            penalty = g.sum_from_shards(penalty)
            y = codes @ m.W_dec
        x_hat = g.sum_from_shards(y) + m.b_dec
        aux = None
        if aux_mask is not None and getattr(m.cfg, "auxk_coef", 0) > 0:
            aux = self._auxk(pre, aux_mask, m.cfg.effective_k_aux)
        return ForwardOutput(x_hat, codes, penalty, aux)

    # ---- the code layer ----------------------------------------------------------------------
    def _top(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """This shard's k candidates per row: (pre-activations, global ids), padded with -inf, id -1."""
        top, idx = pre.detach().topk(min(k, pre.shape[1]), dim=1)
        return _pad(top, idx + self.start, k)

    def _merged(self, pre: Tensor, values: Tensor, ids: Tensor, k: int) -> SparseCodes:
        """The global top k of every shard's candidates, as this shard's codes (others' slots are 0)."""
        top, win = self.group.merge_topk(values, ids, k)
        own = (win >= self.start) & (win < self.stop) & torch.isfinite(top)
        local = torch.where(own, win - self.start, 0)
        return SparseCodes(torch.relu(pre.gather(1, local)) * own, local)

    def _batch_topk(self, pre: Tensor) -> Tensor:
        """BatchTopK's k * batch largest activations of the whole batch, kept where this shard holds them."""
        m, n = self.inner, self.inner.cfg.d_sae
        acts = torch.relu(pre)
        rows, width = acts.shape
        flat = acts.detach().flatten()
        top, pos = flat.topk(min(m.cfg.k * rows, flat.numel()), sorted=False)
        ids = pos // width * n + self.start + pos % width  # row * n + global latent
        kept, win = self.group.merge_flat_topk(top, ids, m.cfg.k * rows)
        latent = win % n
        own = (latent >= self.start) & (latent < self.stop)
        mask = torch.zeros(rows * width, dtype=torch.bool, device=acts.device)
        mask[(win // n * width + latent - self.start)[own]] = True
        from flashsae.models.topk import follow_threshold

        follow_threshold(m, kept, m.cfg.threshold_momentum)  # the inference threshold, from the merged selection
        return acts * mask.view_as(acts)

    def _auxk(self, pre: Tensor, aux_mask, k_aux: int) -> Tensor:
        """AuxK (Gao et al., 2024, App. B.1) over the group: each shard's dead candidates, merged."""
        dead = kernels.DeadLatents.of(aux_mask)
        pre = pre[:dead.n_rows(pre.shape[0])]  # the same rows on every shard: they hold the same batch
        values, idx = auxk.select(pre.detach(), dead, dead.k_aux(k_aux), cpu_topk.topk)
        ids = torch.where(torch.isfinite(values), idx + self.start, -1)
        codes = self._merged(pre, *_pad(values, ids, k_aux), k_aux)
        return self.group.sum_from_shards(kernels.sparse_decode(codes.values, codes.indices, self.inner.W_dec))

    # ---- back to one model ---------------------------------------------------------------------
    @torch.no_grad()
    def gather(self) -> SparseAutoencoder:
        """The whole model (a copy) from every shard's rows; a collective over the group."""
        full = copy.deepcopy(self.inner)
        for name in self.sharded_names:
            setattr(full, name, nn.Parameter(self.group.gather(getattr(self.inner, name).detach(), 0)))
        return full


def _pad(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, ids) widened to k columns with -inf values and id -1 (a shard with fewer than k)."""
    missing = k - values.shape[1]
    if missing <= 0:
        return values, ids
    fill = values.new_full((values.shape[0], missing), float("-inf"))
    return torch.cat([values, fill], 1), torch.cat([ids, ids.new_full(fill.shape, -1)], 1)


def shard(model: SparseAutoencoder, group: LatentGroup):
    """`model` itself on a group of one rank, else this rank's `ShardedSAE` of it."""
    return model if group.size == 1 else ShardedSAE(model, group)
