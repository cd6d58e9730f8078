"""Kernels of the sparse fast path.

`reference` is the specification in plain PyTorch; faster implementations (Triton on GPU) share
its signatures and are chosen per call by device, availability and the `FLASHSAE_KERNELS`
environment variable (`reference` or `triton`). Nothing is printed at import.

Default: Triton for CUDA tensors when triton imports, the reference otherwise. `triton` forces the
Triton kernels wherever they can run: CUDA tensors, or CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, for tests); elsewhere the reference runs.
"""
from __future__ import annotations

import functools
import os

from torch import Tensor

from flashsae.kernels import reference


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _impl(device) -> str:
    choice = os.environ.get("FLASHSAE_KERNELS", "").strip().lower()
    if choice == "reference":
        return "reference"
    on_cuda = getattr(device, "type", str(device)) == "cuda"
    runnable = on_cuda or (choice == "triton" and os.environ.get("TRITON_INTERPRET", "") == "1")
    return "triton" if runnable and _triton_importable() else "reference"


def topk_encode(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, aux_mask: Tensor | None = None,
                k_aux: int = 0, b_dec: Tensor | None = None, shared: dict | None = None, impl: str | None = None):
    """Top-k ReLU encoder with a sparse backward; see `reference.topk_encode`."""
    impl = impl or _impl(W_enc.device)
    if impl == "triton":
        from flashsae.kernels import triton_ops
        if b_dec is not None:
            x_c = x_c - b_dec
        return triton_ops.topk_encode(x_c, W_enc, b_enc, k, aux_mask=aux_mask, k_aux=k_aux)
    return reference.topk_encode(x_c, W_enc, b_enc, k, aux_mask=aux_mask, k_aux=k_aux, b_dec=b_dec, shared=shared)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, *, shared: dict | None = None,
                  impl: str | None = None) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]], shape (batch, d_in); see `reference.sparse_decode`."""
    impl = impl or _impl(W_dec.device)
    if impl == "triton":
        from flashsae.kernels import triton_ops
        return triton_ops.sparse_decode(values, indices, W_dec)
    return reference.sparse_decode(values, indices, W_dec, shared=shared)
