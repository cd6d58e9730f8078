"""Better codes at inference: refine the values of the latents an encoder chose, keeping its support.

An amortised encoder picks good latents but, trained to be fast, not their best values: TopK's
values are the pre-activations, which shrink or overshoot where atoms overlap. Holding the support
fixed, the values that best reconstruct a row solve a small nonnegative least-squares problem over
the k chosen atoms. `refine_codes` takes a few steps of projected gradient descent on it from the
encoder's values (ISTA without the penalty, as in the decoder-based refinement of
Gregor & LeCun, 2010), so the reconstruction error never rises and the codes stay as sparse.

Imports only torch.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def refine_codes(target: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, steps: int) -> Tensor:
    """Values on the same support that reconstruct `target` better: `steps` projected gradient steps.

    Minimises ||target - sum_j v_j W_dec[indices_j]||^2 over v >= 0, started at `values`, with the
    step 1 / L per row, L the Gershgorin bound on the largest eigenvalue of the selected atoms'
    Gram matrix (so every step is a descent step).

    Args:
        target: (batch, d) what the codes should reconstruct (the row minus b_dec, standardised).
        values, indices: (batch, k) the encoder's codes.
        W_dec: (d_sae, d) decoder rows.
        steps: gradient steps (0 returns `values`).

    Returns:
        (batch, k) refined values, zero where the encoder's value was zero.
    """
    if steps <= 0:
        return values
    atoms = W_dec[indices].float()                     # (batch, k, d)
    gram = atoms @ atoms.transpose(1, 2)               # (batch, k, k)
    live = (values > 0).float()                        # latents the encoder switched off stay off
    gram = gram * live[:, :, None] * live[:, None, :]
    rhs = (atoms @ target.float()[:, :, None]).squeeze(-1) * live  # (batch, k)
    step = 1.0 / gram.abs().sum(-1).amax(-1, keepdim=True).clamp_min(1e-12)  # (batch, 1)
    v = values.float() * live
    for _ in range(steps):
        grad = (gram @ v[:, :, None]).squeeze(-1) - rhs
        v = (v - step * grad).clamp_min(0.0)
    return v.to(values.dtype)


def check_refinable(model, steps: int) -> None:
    """Raise ConfigError unless `model` can have its codes refined with `steps` steps."""
    from flashsae.errors import ConfigError

    if steps < 0:
        raise ConfigError(f"refine must be >= 0 steps, got {steps}")
    if steps and (model.is_deep or not model.is_sae):
        raise ConfigError("refine needs a one-layer sparse autoencoder (a linear decoder that reconstructs "
                          f"its own input); {model.architecture} is not one")


@torch.no_grad()
def refined_forward(model, x_std: Tensor, steps: int):
    """(codes, x_hat) of standardised rows: the model's own support with values refined by `steps`
    projected gradient steps; codes are SparseCodes, x_hat standardised, like `model(x_std)`."""
    from flashsae.models.base import SparseCodes

    out = model(x_std)
    codes = out.codes
    if not isinstance(codes, SparseCodes):  # dense codes: their nonzero entries are the support
        width = max(1, int((codes != 0).sum(-1).max()))
        values, indices = codes.topk(width, dim=-1)
        codes = SparseCodes(values.clamp_min(0), indices)
    values = refine_codes(x_std - model.b_dec, codes.values, codes.indices, model.W_dec, steps)
    codes = SparseCodes(values, codes.indices)
    return codes, model.decode_codes(codes)
