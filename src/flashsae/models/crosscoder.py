"""Crosscoders (Lindsey et al., 2024, acausal): one code read from and written to several layers.

The input row is L layers side by side (`flashsae train L0/ L1/ L2/`, or a `data.layers.LayerSource`),
L blocks of d = d_in / L columns; the same layers of several models work the same way. Every latent
reads all layers and writes one atom per layer, so a feature that persists across layers is one
latent instead of one per layer.

`crosscoder`: ReLU codes with the L1 penalty weighted by the sum of each latent's per-layer decoder
norms, sum_j f_j sum_l ||d_j^l||, so that a latent pays for every layer it writes to; decoder rows
are not normalised (the penalty keeps them in check).
`topk-crosscoder`: TopK codes on the sparse fast path, decoder rows of unit norm over all layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashsae.errors import ConfigError
from flashsae.models.base import ForwardOutput, ModelConfig, SparseAutoencoder
from flashsae.models.registry import register
from flashsae.models.topk import TopKConfig, TopKSAE


@dataclass(frozen=True, kw_only=True)
class LayerOptions:
    layers: int | None = None
    """Layers side by side in each row (equal blocks of columns); None: the number of data paths."""


def check_layers(cfg) -> None:
    """The layer axis splits the columns evenly; per-layer decoder atoms need a linear decoder."""
    if cfg.encoder_hidden or cfg.decoder_hidden:
        raise ConfigError("a crosscoder or cross-layer transcoder has one layer; "
                          "drop --encoder-hidden/--decoder-hidden")
    if cfg.layers is None or cfg.layers < 2:
        raise ConfigError(f"a crosscoder needs at least 2 layers, got {cfg.layers or 1}: give one path per layer")
    if cfg.d_in % cfg.layers:
        raise ConfigError(f"{cfg.d_in} columns do not split into {cfg.layers} layers of equal width")


class Layered:
    """Mixin: the layer blocks of a model whose rows are several layers side by side."""

    supports_hidden = False

    @property
    def layer_width(self) -> int:
        return self.d_out // self.cfg.layers

    def decoder_layer_norms(self) -> Tensor:
        """(d_sae, layers): the norm of each latent's decoder atom in each layer, with its gradient."""
        return self.W_dec.view(self.d_sae, self.cfg.layers, self.layer_width).norm(dim=-1)

    @torch.no_grad()
    def layer_norms(self) -> Tensor:
        """(d_sae, layers): the norm of each latent's decoder atom in each layer."""
        return self.decoder_layer_norms()


@dataclass(frozen=True, kw_only=True)
class CrosscoderConfig(LayerOptions, ModelConfig):
    l1: float = 1.0
    """L1 coefficient lambda on sum_j f_j sum_l ||d_j^l|| (standardised units)."""

    normalize_decoder: bool = False
    """Keep decoder rows at unit norm; off by default, the penalty weighs the decoder norms instead."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layers(self)
        if self.l1 < 0:
            raise ConfigError(f"l1 must be >= 0, got {self.l1}")


@register("crosscoder")
class Crosscoder(Layered, SparseAutoencoder):
    """One code read from and written to several layers (Lindsey et al., 2024): ReLU with the L1
    penalty weighted by the sum of each latent's per-layer decoder norms."""

    config_cls = CrosscoderConfig

    def forward(self, x: Tensor, *, aux_mask: Tensor | None = None) -> ForwardOutput:
        codes = torch.relu(self.pre_acts(x))
        x_hat = self.decode_dense(codes)
        penalty = self.cfg.l1 * (codes @ self.decoder_layer_norms().sum(-1)).mean()
        return ForwardOutput(x_hat, codes, penalty)


@dataclass(frozen=True, kw_only=True)
class TopKCrosscoderConfig(LayerOptions, TopKConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        check_layers(self)


@register("topk-crosscoder")
class TopKCrosscoder(Layered, TopKSAE):
    """One code read from and written to several layers, with TopK codes on the sparse fast path."""

    config_cls = TopKCrosscoderConfig
    saelens_architecture = None  # SAELens has no crosscoders
    saelens_imports = False
