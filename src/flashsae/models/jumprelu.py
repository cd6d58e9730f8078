"""JumpReLU codes with an L0 penalty trained through straight-through estimators.

Rajamanoharan et al., 2024 ("Jumping Ahead"): h = z * H(z - theta) with a learned per-latent
threshold theta; the gradient of H with respect to theta uses a rectangle kernel of width eps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flashsae.errors import ConfigError
from flashsae.models.base import ModelConfig, SparseAutoencoder
from flashsae.models.registry import register


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        g_z = g * (z > theta)
        g_theta = -(theta / eps) * _rect((z - theta) / eps) * g
        return g_z, g_theta.sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = -(1.0 / eps) * _rect((z - theta) / eps) * g
        return None, g_theta.sum(0), None


@dataclass(frozen=True, kw_only=True)
class JumpReLUConfig(ModelConfig):
    l0: float = 0.05
    """Coefficient lambda of the L0 penalty (mean number of active latents per row)."""

    bandwidth: float = 0.05
    """Width eps of the rectangle kernel in the straight-through gradient."""

    init_threshold: float = 0.1
    """Initial threshold theta of every latent (standardised units)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l0 < 0:
            raise ConfigError(f"l0 must be >= 0, got {self.l0}")
        if self.bandwidth <= 0 or self.init_threshold <= 0:
            raise ConfigError("bandwidth and init_threshold must be > 0")


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """ReLU codes zeroed below a learned per-latent threshold, trained with an L0 penalty through
    straight-through estimators (Rajamanoharan et al., 2024); L0 falls as l0 rises."""

    config_cls = JumpReLUConfig
    latent_sharding = "elementwise"  # the threshold and the L0 sum act per latent (models.sharded)
    saelens_architecture = "jumprelu"
    saelens_imports = True
    saelens_tensors = ("threshold",)

    def __init__(self, cfg, standardizer=None):
        super().__init__(cfg, standardizer)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))

    def saelens_extras(self) -> tuple[dict, dict[str, Tensor]]:
        return {}, {"threshold": self.log_threshold.detach().float().cpu().exp()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        # flashsae: z * (z > theta) with z = relu(pre), theta = exp(log_threshold); SAELens: relu(pre) *
        # (pre > threshold). Equal for threshold > 0; a threshold <= 0 means plain ReLU, i.e. theta -> 0.
        self.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())

    def activate(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.relu(pre_acts)
        theta = self.log_threshold.exp()
        codes = _JumpReLU.apply(z, theta, self.cfg.bandwidth)
        l0 = _Step.apply(z, theta, self.cfg.bandwidth).sum(-1).mean()
        return codes, self.cfg.l0 * l0
