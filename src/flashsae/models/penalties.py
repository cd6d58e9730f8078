"""Sparsity penalties as pure tensor functions (no parameters, no state)."""
from __future__ import annotations

import torch
from torch import Tensor


def l1(codes: Tensor) -> Tensor:
    """Mean over rows of sum_i relu(h_i). Codes are already non-negative for ReLU SAEs."""
    return codes.clamp_min(0).sum(-1).mean()


def kl_sparsity(probs: Tensor, rho: float, eps: float = 1e-6) -> Tensor:
    """sum_j KL(rho || rho_hat_j) with rho_hat_j the batch-mean activation of latent j (Ng, 2011)."""
    rho_hat = probs.mean(0).clamp(eps, 1 - eps)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


def contractive_one_layer(pre_acts: Tensor, W_enc: Tensor) -> Tensor:
    """Closed-form ||dh/dx||_F^2 for h = relu(x W_enc^T + b), averaged over rows.

    J = diag(1[pre > 0]) W_enc, so ||J||_F^2 = sum_j 1[pre_j > 0] ||W_enc[j]||^2 (Rifai et al., 2011,
    with ReLU in place of the sigmoid).
    """
    row_sq = W_enc.pow(2).sum(-1)  # (d_sae,)
    return ((pre_acts > 0).to(row_sq.dtype) @ row_sq).mean()


def contractive_deep(masks: list[Tensor], weights: list[Tensor]) -> Tensor:
    """||dh/dx||_F^2 averaged over rows for a ReLU MLP encoder.

    Args:
        masks: per layer, the (batch, width) derivative of its activation (1[pre > 0] for ReLU).
        weights: per layer, the (width, fan_in) weight matrix, first layer first.
    """
    J = masks[0].unsqueeze(-1) * weights[0]  # (batch, h1, d_in)
    for m, W in zip(masks[1:], weights[1:]):
        J = m.unsqueeze(-1) * torch.matmul(W, J)  # (batch, h_next, d_in)
    return J.pow(2).sum((-2, -1)).mean()
