"""Sigmoid codes with the KL target-sparsity penalty (Ng, 2011, CS294A lecture notes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashsae.errors import ConfigError
from flashsae.models import penalties
from flashsae.models.base import ModelConfig, SparseAutoencoder
from flashsae.models.registry import register


@dataclass(frozen=True, kw_only=True)
class KLConfig(ModelConfig):
    beta: float = 0.5
    """Weight beta of the penalty sum_j KL(rho || rho_hat_j)."""

    rho: float = 0.02
    """Target mean activation rho of each latent, in (0, 1)."""

    active_threshold: float = 0.05
    """Sigmoid outputs below this are set to zero, so that codes are sparse (and L0 is meaningful)."""

    normalize_decoder: bool = False
    """Sigmoid codes live in (0, 1), so decoder rows need their own norm: off by default here."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.rho < 1:
            raise ConfigError(f"rho must be in (0, 1), got {self.rho}")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if not 0 <= self.active_threshold < 1:
            raise ConfigError(f"active_threshold must be in [0, 1), got {self.active_threshold}")


@register("kl")
class KLSAE(SparseAutoencoder):
    """Sigmoid codes with a KL penalty pulling each latent's mean activation to rho (Ng, 2011);
    outputs below active_threshold are zeroed, so L0 falls with rho.

    h = s * 1[s > tau] with s = sigmoid(pre_acts); penalty beta * sum_j KL(rho || mean_t s_tj).
    """

    config_cls = KLConfig

    def activate(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(pre_acts)
        codes = s * (s > self.cfg.active_threshold)
        return codes, self.cfg.beta * penalties.kl_sparsity(s, self.cfg.rho)
