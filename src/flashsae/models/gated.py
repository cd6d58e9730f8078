"""Gated SAE (Rajamanoharan et al., 2024): which latents fire and how strongly, decided apart.

One encoder product serves two paths that share its directions: the gate pi_gate = W_enc (x - b_dec)
+ b_gate decides which latents fire, the magnitude pi_mag = exp(r_mag) * W_enc (x - b_dec) + b_mag
how much; codes are 1[pi_gate > 0] * relu(pi_mag). The L1 penalty falls on the gate's ReLU alone,
so it no longer shrinks the magnitudes, and an auxiliary reconstruction of the gate's ReLU codes
through a frozen copy of the decoder teaches the gate what the decoder needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flashsae.errors import ConfigError
from flashsae.models.base import ForwardOutput, ModelConfig, SparseAutoencoder
from flashsae.models.registry import register


@dataclass(frozen=True, kw_only=True)
class GatedConfig(ModelConfig):
    l1: float = 1.0
    """L1 coefficient lambda on sum_i relu(pi_gate_i) ||d_i|| (standardised units)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1 < 0:
            raise ConfigError(f"l1 must be >= 0, got {self.l1}")


@register("gated")
class GatedSAE(SparseAutoencoder):
    """Gate and magnitude paths sharing encoder directions (Rajamanoharan et al., 2024): the L1
    penalty picks which latents fire without shrinking how strongly they do."""

    config_cls = GatedConfig
    saelens_architecture = "gated"
    saelens_imports = True
    saelens_tensors = ("b_gate", "r_mag", "b_mag")
    saelens_replaces = ("b_enc",)  # SAELens calls the gate's bias b_gate

    def __init__(self, cfg, standardizer=None):
        super().__init__(cfg, standardizer)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate, pi_mag) of standardised input, from one encoder product."""
        proj = nn.functional.linear(self.encoder_trunk(x), self.W_enc)
        return proj + self.b_enc, proj * self.r_mag.exp() + self.b_mag

    def forward(self, x: Tensor, *, aux_mask: Tensor | None = None) -> ForwardOutput:
        pi_gate, pi_mag = self.paths(x)
        codes = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        x_hat = self.decode_dense(codes)
        if not self.training:
            return ForwardOutput(x_hat, codes, x.new_zeros(()))
        gate = torch.relu(pi_gate)
        norms = self.W_dec.norm(dim=-1) if not self.cfg.normalize_decoder else None
        weighted = gate if norms is None else gate * norms
        penalty = self.cfg.l1 * weighted.sum(-1).mean()
        frozen = gate @ self.W_dec.detach()  # with hidden decoder layers those still learn from this path
        frozen = frozen + self.b_dec.detach() if not self.is_deep else self._decoder_tail(frozen)
        return ForwardOutput(x_hat, codes, penalty, None, (frozen,))

    def saelens_extras(self) -> tuple[dict, dict[str, Tensor]]:
        detach = {n: getattr(self, n).detach().float().cpu().clone() for n in ("r_mag", "b_mag")}
        return {}, {"b_gate": self.b_enc.detach().float().cpu().clone(), **detach}

    @classmethod
    def saelens_options(cls, cfg: dict) -> dict:
        return {"l1": float(cfg.get("l1_coefficient", 1.0) or 0.0)}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.b_enc.copy_(tensors["b_gate"])
        self.r_mag.copy_(tensors["r_mag"])
        self.b_mag.copy_(tensors["b_mag"])
