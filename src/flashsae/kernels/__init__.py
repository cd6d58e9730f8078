"""Kernels of the sparse fast path.

`reference` is the specification in plain PyTorch; faster implementations (Triton on GPU) share
its signatures and are chosen per call by device, availability and the `FLASHSAE_KERNELS`
environment variable, parsed in `selection` (a bad value is a ConfigError, never a quiet
fall-back). Nothing is printed at import; `describe(device)` says which path runs, and training
records it in config.json.

Default: Triton for CUDA tensors when triton imports, the reference otherwise. `triton` forces the
Triton kernels wherever they can run: CUDA tensors, or CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, for tests); elsewhere the reference runs.
"""
from __future__ import annotations

from torch import Tensor

from flashsae.kernels import reference, selection


def describe(device) -> dict:
    """The kernel path a model on `device` runs, for the run's config.json (`resolved`).

    Also checks FLASHSAE_KERNELS (a ConfigError for a bad value), so training calls it once at start.
    """
    import torch

    from flashsae.kernels import cpu_topk

    device = torch.device(device)
    return {"kernels": selection.impl(device), "kernels_setting": selection.setting(),
            "cpu_topk": ("compiled" if cpu_topk.available() else "torch.topk") if device.type == "cpu" else None}


def topk_encode(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, aux_mask: Tensor | None = None,
                k_aux: int = 0, b_dec: Tensor | None = None, shared: dict | None = None, impl: str | None = None):
    """Top-k ReLU encoder with a sparse backward; see `reference.topk_encode`."""
    impl = impl or selection.impl(W_enc.device)
    if impl == "triton":
        from flashsae.kernels import triton_ops
        if b_dec is not None:
            x_c = x_c - b_dec
        return triton_ops.topk_encode(x_c, W_enc, b_enc, k, aux_mask=aux_mask, k_aux=k_aux)
    return reference.topk_encode(x_c, W_enc, b_enc, k, aux_mask=aux_mask, k_aux=k_aux, b_dec=b_dec, shared=shared)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, *, shared: dict | None = None,
                  impl: str | None = None) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]], shape (batch, d_in); see `reference.sparse_decode`."""
    impl = impl or selection.impl(W_dec.device)
    if impl == "triton":
        from flashsae.kernels import triton_ops
        return triton_ops.sparse_decode(values, indices, W_dec)
    return reference.sparse_decode(values, indices, W_dec, shared=shared)
