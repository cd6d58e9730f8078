"""Matryoshka BatchTopK SAE (Bussmann et al., 2025; Nabeshima, 2024): nested dictionaries.

The latents are ordered, and every prefix of them (the first m latents, for each width m of
`prefixes`) must reconstruct the input on its own: the loss is the sum over prefixes of
||x - (b_dec + sum_{i<m} z_i d_i)||^2. General concepts settle in the first latents, which every
prefix needs, and specific ones in the later latents, so a parent feature is not split up and
absorbed by its children as it is in a flat dictionary.

Training keeps the k * batch largest activations of the batch (BatchTopK) among each row's best
`candidates` latents, on the sparse fast path: the encoder selects the candidates with the sparse
top-k kernel, every prefix's reconstruction is a gather-sum over the candidates that lie inside
it, and no (batch, d_sae) tensor is decoded. Inference applies the learned global threshold
(JumpReLU with one threshold), which is also how it exports to SAELens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashsae import kernels
from flashsae.errors import ConfigError
from flashsae.kernels import cpu_topk
from flashsae.models.base import ForwardOutput, SparseAutoencoder, SparseCodes
from flashsae.models.registry import register
from flashsae.models.topk import BatchTopKConfig, Thresholded, dense_aux, follow_threshold


@dataclass(frozen=True, kw_only=True)
class MatryoshkaConfig(BatchTopKConfig):
    prefixes: tuple[float, ...] = ()
    """Widths of the nested dictionaries, increasing: numbers of latents, or fractions of them
    below 1 (0.25 is a quarter); the full width is always the last. Empty picks d_sae/64, d_sae/16,
    d_sae/4 and d_sae (those of at least k latents)."""

    candidates: int | None = None
    """Latents per row the batch-level selection chooses from during training; None picks 4 k.
    Rows that would keep more than this many keep their largest `candidates`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "prefixes", tuple(float(p) for p in self.prefixes))
        for p in self.prefixes:
            if not (0 < p < 1 or (p >= 1 and p == int(p))):
                raise ConfigError(f"prefixes must be whole numbers of latents or fractions in (0, 1), got {p:g}")
        widths = self.widths
        if widths != sorted(set(widths)):
            given = ", ".join(f"{p:g}" for p in self.prefixes)
            raise ConfigError(f"prefixes must increase and be distinct, got {given}")
        if widths[-1] > self.d_sae:
            raise ConfigError(f"prefix {widths[-1]} exceeds the number of latents ({self.d_sae})")
        if self.candidates is not None and not self.k <= self.candidates <= self.d_sae:
            raise ConfigError(f"candidates must be in [k, d_sae] = [{self.k}, {self.d_sae}], got {self.candidates}")

    @property
    def widths(self) -> list[int]:
        """The prefix widths in latents, the last of them d_sae."""
        if not self.prefixes:
            out = [self.d_sae // q for q in (64, 16, 4) if self.d_sae // q >= max(self.k, 1)]
        else:
            out = [int(round(p * self.d_sae)) if p < 1 else int(p) for p in self.prefixes]
            out = [w for w in out if w != self.d_sae]
        return [*out, self.d_sae] if not out or out[-1] < self.d_sae else out

    @property
    def effective_candidates(self) -> int:
        return self.candidates if self.candidates is not None else min(self.d_sae, 4 * self.k)


@register("matryoshka")
class MatryoshkaSAE(Thresholded, SparseAutoencoder):
    """Nested BatchTopK dictionaries (Bussmann et al., 2025): every prefix of the latents
    reconstructs the input, so general features stay whole in the first latents instead of being
    absorbed by specific ones; a learned threshold at inference."""

    config_cls = MatryoshkaConfig
    k_limited = True

    def forward(self, x: Tensor, *, aux_mask: Tensor | kernels.DeadLatents | None = None) -> ForwardOutput:
        cfg = self.cfg
        if not self.training:
            acts = torch.relu(self.pre_acts(x))
            codes = acts * (acts > self.threshold)
            return ForwardOutput(self.decode_dense(codes), codes, x.new_zeros(()))
        k_aux = cfg.effective_k_aux if (aux_mask is not None and cfg.auxk_coef > 0) else 0
        c = cfg.effective_candidates
        if not self.is_deep:
            values, idx, aux_values, aux_idx = kernels.topk_encode(
                x, self.W_enc, self.b_enc, c, aux_mask=aux_mask, k_aux=k_aux,
                b_dec=self.b_dec if self.is_sae else None)
        else:
            pre = self.pre_acts(x)
            top, idx = cpu_topk.topk(pre, c)
            values = torch.relu(top)
            if k_aux:
                aux_values, aux_idx = dense_aux(pre, aux_mask, k_aux)
        values = values * self._batch_keep(values, x.shape[0])
        codes = SparseCodes(values, idx)
        # Nested reconstructions: prefix m adds the kept latents with index in [previous m, m).
        # All prefixes but the full one go into the extra loss; the full one is x_hat.
        partial = None
        prefix_outputs = []
        lo = 0
        for hi in cfg.widths:
            inside = (idx >= lo) & (idx < hi)
            part = kernels.sparse_decode(values * inside, idx, self.W_dec)
            partial = part if partial is None else partial + part
            prefix_outputs.append(partial)
            lo = hi
        x_hat = self._decoder_tail(prefix_outputs[-1])
        nested = [self._decoder_tail(p) for p in prefix_outputs[:-1]]
        aux = None
        if k_aux:
            aux = kernels.sparse_decode(aux_values, aux_idx, self.W_dec)
            if self.is_deep:
                aux = self._decoder_tail(aux) - self.b_dec
        return ForwardOutput(x_hat, codes, x.new_zeros(()), aux, tuple(nested))

    def _batch_keep(self, values: Tensor, n_rows: int) -> Tensor:
        """1 for the k * n_rows largest candidate activations of the batch, else 0; moves the threshold."""
        flat = values.detach().flatten()
        n_keep = min(self.cfg.k * n_rows, flat.numel())
        top, pos = flat.topk(n_keep, sorted=False)
        keep = torch.zeros_like(flat).index_fill_(0, pos, 1.0).view_as(values)
        follow_threshold(self, top, self.cfg.threshold_momentum)
        return keep.to(values.dtype)
