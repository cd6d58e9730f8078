"""Kernels of the sparse fast path.

`reference` is the specification in plain PyTorch; faster implementations (Triton on GPU) share
its signatures and are chosen per call by device, availability and the `FLASHSAE_KERNELS`
environment variable, parsed by `selection.setting()` and nowhere else (a bad value is a
ConfigError, never a quiet fall-back). Nothing is printed at import.

Default (unset, empty or `auto`): Triton for CUDA tensors when triton imports, the reference
otherwise, with the compiled top-k of `cpu_topk` on the CPU when it builds. `reference`: plain
PyTorch everywhere, torch.topk included. `triton` forces the Triton kernels wherever they can run:
CUDA tensors, or CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, for tests);
elsewhere the reference runs. `triton` without triton installed is a ConfigError.

`describe(device)` says which path a model on `device` runs, and checks the setting; training
calls it once at start and records the result in config.json under `resolved`. On an AVX-512 CPU
with FLASHSAE_KERNELS unset, `describe("cpu")` is

    {"kernels": "reference", "kernels_setting": "auto", "cpu_topk": "compiled (avx512)"}

`kernels` is "triton" or "reference"; `kernels_setting` the parsed FLASHSAE_KERNELS ("auto",
"reference" or "triton"); `cpu_topk` is "compiled (avx512)", "compiled (portable)" or "torch.topk"
on the CPU, None elsewhere.
"""
from __future__ import annotations

import torch
from torch import Tensor

from flashsae.kernels import reference, selection
from flashsae.kernels.auxk import DeadLatents

__all__ = ["DeadLatents", "describe", "sparse_decode", "topk_encode"]


def describe(device: torch.device | str) -> dict[str, str | None]:
    """The kernel path a model on `device` runs: keys kernels, kernels_setting, cpu_topk (see above).

    Raises:
        ConfigError: FLASHSAE_KERNELS has an unknown value, or is `triton` without triton installed.
    """
    from flashsae.kernels import cpu_topk

    device = torch.device(device)
    described = {"kernels": selection.impl(device), "kernels_setting": selection.setting(), "cpu_topk": None}
    if device.type == "cpu":
        build = cpu_topk.build()
        described["cpu_topk"] = f"compiled ({build})" if build else "torch.topk"
    return described


def topk_encode(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, aux_mask: Tensor | DeadLatents | None = None,
                k_aux: int = 0, b_dec: Tensor | None = None, shared: dict | None = None, impl: str | None = None):
    """Top-k ReLU encoder with a sparse backward; see `reference.topk_encode`."""
    impl = impl or selection.impl(W_enc.device)
    if impl == "triton":
        from flashsae.kernels import triton_ops
        return triton_ops.topk_encode(x_c, W_enc, b_enc, k, aux_mask=aux_mask, k_aux=k_aux, b_dec=b_dec,
                                      shared=shared)
    return reference.topk_encode(x_c, W_enc, b_enc, k, aux_mask=aux_mask, k_aux=k_aux, b_dec=b_dec, shared=shared)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, *, shared: dict | None = None,
                  impl: str | None = None) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]], shape (batch, d_in); see `reference.sparse_decode`."""
    impl = impl or selection.impl(W_dec.device)
    if impl == "triton":
        from flashsae.kernels import triton_ops
        return triton_ops.sparse_decode(values, indices, W_dec, shared=shared)
    return reference.sparse_decode(values, indices, W_dec, shared=shared)
