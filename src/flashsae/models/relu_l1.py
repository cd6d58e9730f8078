"""ReLU codes with an L1 penalty: the classic sparse autoencoder (lambda = 0 is a plain autoencoder)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashsae.errors import ArtifactError, ConfigError
from flashsae.models import penalties
from flashsae.models.base import ModelConfig, SparseAutoencoder
from flashsae.models.registry import register


@dataclass(frozen=True, kw_only=True)
class ReluL1Config(ModelConfig):
    l1: float = 0.05
    """L1 coefficient lambda on sum_i relu(h_i) (standardised units); 0 gives a plain autoencoder."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1 < 0:
            raise ConfigError(f"l1 must be >= 0, got {self.l1}")


@register("relu-l1")
class ReluL1SAE(SparseAutoencoder):
    """ReLU codes with the L1 penalty l1 * sum_i h_i, the classic sparse autoencoder: L0 falls as l1
    rises, and l1 = 0 is a plain autoencoder.

    h = relu(W_enc (x - b_dec) + b_enc), loss ||x - x_hat||^2 + l1 * sum_i h_i.
    """

    config_cls = ReluL1Config
    latent_sharding = "elementwise"  # relu and the L1 sum act per latent (models.sharded)
    saelens_architecture = "standard"
    saelens_imports = True

    @classmethod
    def saelens_options(cls, cfg: dict) -> dict:
        act = cfg.get("activation_fn") or "relu"
        if act != "relu":
            raise ArtifactError(f"activation {act!r} is not supported for standard SAEs (only relu)")
        return {"l1": float(cfg.get("l1_coefficient", 0.0) or 0.0)}

    def activate(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        codes = torch.relu(pre_acts)
        return codes, self.cfg.l1 * penalties.l1(codes)
