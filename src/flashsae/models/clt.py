"""Cross-layer transcoder (Ameisen et al., 2025): features read one layer and write to it and every later one.

The input row is the L layers' MLP inputs side by side (stream x) and the target their MLP
outputs (stream y), each L blocks of d columns. The latents come in L groups of n = d_sae / L:
group l reads only layer l's input (its encoder rows have d columns, not L * d) and writes to the
outputs of layers l, l+1, ..., L-1. The loss is the squared error summed over all output layers.
Codes are TopK over all latents of a row (with AuxK for dead latents).

Memory: the encoder holds n * L * d weights; the decoder is stored as (d_sae, L * d) with the
blocks below the diagonal held at zero (their gradient is masked), so it holds n * L^2 * d
weights of which n * d * L (L + 1) / 2 are used. Parameters and Adam moments are 3 x 4 bytes each
in fp32: GPT-2 small (L = 12, d = 768) with n = 4,096 latents per layer is 38 M encoder and
453 M decoder weights, about 5.9 GB with moments.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flashsae import kernels
from flashsae.errors import ConfigError
from flashsae.kernels import cpu_topk
from flashsae.models.base import ForwardOutput, SparseCodes
from flashsae.models.crosscoder import Layered, LayerOptions, check_layers
from flashsae.models.registry import register
from flashsae.models.topk import TopKConfig, TopKSAE, dense_aux


@dataclass(frozen=True, kw_only=True)
class CLTConfig(LayerOptions, TopKConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        check_layers(self)
        if self.d_sae % self.layers:
            raise ConfigError(f"{self.d_sae} latents do not split into {self.layers} layers of equal size")


@register("clt")
class CrossLayerTranscoder(Layered, TopKSAE):
    """Features that read one layer's MLP input and write to its output and every later layer's
    (Ameisen et al., 2025): TopK codes, the loss summed over the output layers."""

    config_cls = CLTConfig
    targets = ("y",)
    saelens_architecture = None  # SAELens has no cross-layer transcoders
    saelens_imports = False

    def __init__(self, cfg, standardizer=None):
        super().__init__(cfg, standardizer)
        layers, n = cfg.layers, cfg.d_sae // cfg.layers
        width = cfg.d_in // layers
        self.W_enc = nn.Parameter(torch.randn(cfg.d_sae, width) / width ** 0.5)
        source = torch.arange(cfg.d_sae) // n                          # the layer each latent reads
        target = torch.arange(self.d_out) // (self.d_out // layers)    # the layer each output column is
        self.register_buffer("write_mask", (target[None, :] >= source[:, None]).to(self.W_dec.dtype),
                             persistent=False)
        with torch.no_grad():
            self.W_dec.mul_(self.write_mask)
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def pre_acts(self, x: Tensor) -> Tensor:
        layers = self.cfg.layers
        xs = x.view(x.shape[0], layers, -1)                              # (batch, L, d)
        w = self.W_enc.view(layers, self.d_sae // layers, -1)            # (L, n, d)
        return torch.einsum("bld,lnd->bln", xs, w).reshape(x.shape[0], -1) + self.b_enc

    def forward(self, x: Tensor, *, aux_mask: Tensor | None = None) -> ForwardOutput:
        cfg = self.cfg
        pre = self.pre_acts(x)
        top, idx = cpu_topk.topk(pre, cfg.k)
        codes = SparseCodes(torch.relu(top), idx)
        x_hat = kernels.sparse_decode(codes.values, idx, self.W_dec) + self.b_dec
        aux = None
        if aux_mask is not None and cfg.auxk_coef > 0:
            aux_codes = dense_aux(pre, aux_mask, cfg.effective_k_aux)
            aux = kernels.sparse_decode(aux_codes.values, aux_codes.indices, self.W_dec)
        return ForwardOutput(x_hat, codes, x.new_zeros(()), aux)

    @torch.no_grad()
    def constrain_decoder_grad(self) -> None:
        if self.W_dec.grad is not None:
            self.W_dec.grad.mul_(self.write_mask)  # no feature writes to a layer before its own
        super().constrain_decoder_grad()
