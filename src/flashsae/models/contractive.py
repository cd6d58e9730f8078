"""ReLU codes with the contractive penalty lambda * ||dh/dx||_F^2 (Rifai et al., 2011)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flashsae.errors import ConfigError
from flashsae.models import penalties
from flashsae.models.base import ForwardOutput, ModelConfig, SparseAutoencoder
from flashsae.models.registry import register


@dataclass(frozen=True, kw_only=True)
class ContractiveConfig(ModelConfig):
    contractive: float = 0.05
    """Coefficient lambda of the squared Frobenius norm of the encoder Jacobian."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.contractive < 0:
            raise ConfigError(f"contractive must be >= 0, got {self.contractive}")


@register("contractive")
class ContractiveSAE(SparseAutoencoder):
    """ReLU codes with a penalty on the squared Frobenius norm of the encoder's Jacobian dh/dx (Rifai
    et al., 2011): robust rather than sparse codes, L0 is not directly controlled.

    h = relu(encoder(x)); closed-form Jacobian norm for one layer, exact layer products when deep.
    """

    config_cls = ContractiveConfig
    saelens_architecture = "standard"  # inference is ReLU(W_enc (x - b_dec) + b_enc); the penalty only trains

    def forward(self, x: Tensor, *, aux_mask: Tensor | None = None) -> ForwardOutput:
        h = x - self.b_dec
        masks, weights = [], []
        for i in range(0, len(self.enc_layers), 2):
            a = nn.functional.linear(h, self.enc_layers[i], self.enc_layers[i + 1])
            masks.append((a > 0).to(a.dtype))
            weights.append(self.enc_layers[i])
            h = torch.relu(a)
        pre = nn.functional.linear(h, self.W_enc, self.b_enc)
        if masks:
            jac = penalties.contractive_deep(masks + [(pre > 0).to(pre.dtype)], weights + [self.W_enc])
        else:
            jac = penalties.contractive_one_layer(pre, self.W_enc)
        codes = torch.relu(pre)
        return ForwardOutput(self.decode_dense(codes), codes, self.cfg.contractive * jac)
