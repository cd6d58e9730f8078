"""Plain-PyTorch specification of the sparse fast path (also the CPU production path).

Only the encoder product is dense. The decoder is a gather-sum of k rows per input and the
weight gradients touch only the selected latents (Gao et al., 2024; OpenAI sparse_autoencoder).
The weight gradients are segment sums over (row, slot) pairs sorted by latent, computed as one
CSR-by-dense product (MKL on the CPU): 8x faster than `index_add_` and the dense product here
(measured at d=256, 4096 latents, k=16, 4096 rows: 14 ms against 110 ms and 320 ms on one core).
On the CPU the top-k selection is the compiled `cpu_topk` kernel when it builds (torch.topk otherwise,
or with FLASHSAE_KERNELS=reference).
"""
from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from flashsae.kernels import cpu_topk


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # accumulate bf16 inputs in fp32


class LatentSegments:
    """The (row, slot) pairs of an index matrix grouped by latent: a CSR matrix (d_sae, rows)."""

    def __init__(self, indices: Tensor, d_sae: int):
        flat = indices.reshape(-1)
        # int32 keys: PyTorch's parallel stable sort of int64 keys ran 100x slower here on 2 threads
        self.order = torch.argsort(flat.to(torch.int32), stable=True)
        self.crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=flat.device)
        torch.cumsum(torch.bincount(flat, minlength=d_sae), 0, out=self.crow[1:])
        self.rows = torch.div(self.order, indices.shape[1], rounding_mode="floor")
        self.shape = (d_sae, indices.shape[0])

    def matmul(self, weights: Tensor, dense: Tensor) -> Tensor:
        """out[j] = sum over pairs (t, i) with indices[t, i] == j of weights[t, i] * dense[t]."""
        acc = _acc_dtype(dense)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            G = torch.sparse_csr_tensor(self.crow, self.rows, weights.reshape(-1)[self.order].to(acc),
                                        size=self.shape, check_invariants=False)
        return G @ dense.to(acc)

    def sum(self, weights: Tensor) -> Tensor:
        """out[j] = sum of weights over the pairs of latent j."""
        w = weights.reshape(-1)[self.order].double()  # prefix sums in fp64: differences stay exact enough
        csum = torch.zeros(w.numel() + 1, dtype=w.dtype, device=w.device)
        torch.cumsum(w, 0, out=csum[1:])
        return (csum[self.crow[1:]] - csum[self.crow[:-1]]).to(_acc_dtype(weights))


def _shared_segments(shared: dict | None, indices: Tensor) -> LatentSegments | None:
    """The decoder backward's grouping of `indices` by latent, when it was made for this very tensor."""
    entry = shared.pop("segments", None) if shared is not None else None
    if entry is not None and entry[0] == indices.data_ptr() and entry[1] == tuple(indices.shape):
        return entry[2]
    return None


def _gather_dot(indices: Tensor, g: Tensor, W: Tensor) -> Tensor:
    """out[t, i] = <g[t], W[indices[t, i]]>, as a sampled dense product (SDDMM) at the code pattern.

    Indices must be distinct within a row (true of top-k codes). 20x faster on the CPU than
    gathering the (batch, k, d_in) rows (measured: 9.7 ms against 198 ms at 4096 x 16 x 256).
    """
    acc = _acc_dtype(g)
    n_rows, k = indices.shape
    cols, order = indices.sort(dim=1)
    crow = torch.arange(0, n_rows * k + 1, k, device=indices.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, cols.reshape(-1), torch.zeros(n_rows * k, dtype=acc, device=g.device),
                                          size=(n_rows, W.shape[0]), check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, g.to(acc), W.to(acc).t(), beta=0.0).values()
    return torch.empty((n_rows, k), dtype=acc, device=g.device).scatter_(1, order, dots.view(n_rows, k))


_BLOCK_BYTES = 64 << 20
_workspaces = threading.local()


def _row_block(n_rows: int, d_sae: int, dtype: torch.dtype, device) -> int:
    """Rows of pre-activations made at once: all of them off the CPU, up to 64 MiB worth on it (MKL's
    fp32 product slows down sharply below ~1024 rows on two cores: 68 ms for 4096 x 4096 in one
    block, 118 ms in blocks of 256)."""
    if getattr(device, "type", device) != "cpu":
        return max(n_rows, 1)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(512, _BLOCK_BYTES // (d_sae * itemsize))


def _workspace(rows: int, cols: int, dtype: torch.dtype, device) -> Tensor:
    """A (rows, cols) scratch buffer reused by this thread on the CPU (models stepped on several
    threads get one each); a fresh tensor elsewhere."""
    if getattr(device, "type", device) != "cpu":
        return torch.empty((rows, cols), dtype=dtype, device=device)
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    key = (cols, dtype)
    buf = cache.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = cache[key] = torch.empty((rows, cols), dtype=dtype)
    return buf[:rows]


class _TopKEncode(torch.autograd.Function):
    """pre = x_c W_enc^T + b_enc; values, indices = top-k of relu(pre) per row.

    Backward is sparse: with g the (batch, k) gradient of the values (zero where relu clipped),
    dW_enc[j] = sum over (t, i) with indices[t, i] == j of g[t, i] * x_c[t], db_enc likewise, and
    dx_c[t] = sum_i g[t, i] * W_enc[indices[t, i]] (with b_dec given, only its sum over rows is
    needed: db_dec = -(db_enc @ W_enc)). AuxK candidates (top-k_aux among dead latents) are selected
    in the same forward and share this backward, so the auxiliary loss trains the encoder too
    (sparsify's fused encoder drops it).
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k, aux_mask, k_aux, shared):
        x_c = x - b_dec if b_dec is not None else x
        ctx.shared = shared
        # The bias rides in the product as an extra input column of ones: addmm would first copy the
        # broadcast bias into the whole (batch, d_sae) output, a quarter of the GEMM's time on the CPU.
        dtype = torch.get_autocast_dtype(x_c.device.type) if torch.is_autocast_enabled(x_c.device.type) else x_c.dtype
        ones = torch.ones((x_c.shape[0], 1), dtype=dtype, device=x_c.device)
        x1 = torch.cat([x_c.to(dtype), ones], dim=1)
        W1 = torch.cat([W_enc.to(dtype), b_enc.to(dtype).unsqueeze(1)], dim=1)
        n_rows, d_sae = x_c.shape[0], W_enc.shape[0]
        aux = aux_mask is not None and k_aux > 0
        top = torch.empty((n_rows, k), dtype=dtype, device=x_c.device)
        idx = torch.empty((n_rows, k), dtype=torch.int64, device=x_c.device)
        atop = torch.empty((n_rows, k_aux if aux else 0), dtype=dtype, device=x_c.device)
        aidx = torch.empty((n_rows, k_aux if aux else 0), dtype=torch.int64, device=x_c.device)
        # On the CPU the pre-activations go to a buffer reused from step to step (a fresh (batch,
        # d_sae) result costs page faults every time: 29 ms against 21 ms for a 4096 x 4096 bf16
        # product, `python -m bench.micro_cpu`), made in blocks of rows that bound the buffer to
        # about 64 MiB per thread.
        block = _row_block(n_rows, d_sae, dtype, x_c.device)
        for start in range(0, n_rows, block):
            stop = min(start + block, n_rows)
            pre = _workspace(stop - start, d_sae, dtype, x_c.device)
            torch.mm(x1[start:stop], W1.t(), out=pre)  # (rows, d_sae)
            cpu_topk.topk(pre, k, out=(top[start:stop], idx[start:stop]))  # torch.topk off the CPU
            if aux:
                cpu_topk.topk(pre.masked_fill_(~aux_mask, float("-inf")), k_aux,
                              out=(atop[start:stop], aidx[start:stop]))
        values = top.clamp_min(0)
        aux_values = atop.clamp_min(0)
        ctx.save_for_backward(x_c, W_enc, idx, values, aidx, aux_values)
        ctx.mark_non_differentiable(idx, aidx)
        return values, idx, aux_values, aidx

    @staticmethod
    def backward(ctx, g_values, _g_idx, g_aux, _g_aidx):
        x_c, W_enc, idx, values, aidx, aux_values = ctx.saved_tensors
        g = torch.where(values > 0, g_values, 0)
        if aidx.shape[1] > 0 and g_aux is not None:
            g = torch.cat([g, torch.where(aux_values > 0, g_aux, 0)], dim=1)
            idx = torch.cat([idx, aidx], dim=1)
        grad_x = grad_b_dec = grad_W = grad_b = None
        acc = _acc_dtype(g)
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_enc.to(acc), per_sample_weights=g.to(acc), mode="sum").to(x_c.dtype)
        if any(ctx.needs_input_grad[1:4]):
            seg = _shared_segments(ctx.shared, idx) or LatentSegments(idx, W_enc.shape[0])
            if ctx.needs_input_grad[2]:
                grad_W = seg.matmul(g, x_c).to(W_enc.dtype)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
                g_sum = seg.sum(g)  # (d_sae,): the b_enc gradient
                grad_b = g_sum.to(W_enc.dtype) if ctx.needs_input_grad[3] else None
                if ctx.needs_input_grad[1]:  # sum over rows of -dx_c: one product, no (batch, d_in) gradient
                    grad_b_dec = -(g_sum.to(acc) @ W_enc.to(acc)).to(x_c.dtype)
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """x_hat[t] = sum_i values[t, i] * W_dec[indices[t, i]]; gather-dot and segment-sum backward."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, shared):
        ctx.save_for_backward(values, indices, W_dec)
        ctx.shared = shared
        # In fp32 even under bf16 autocast: k rows per input are cheap to add exactly, and no bf16
        # copy of W_dec (or fp32 copy of the result for the loss) is needed.
        acc = _acc_dtype(values)
        return F.embedding_bag(indices, W_dec.to(acc), per_sample_weights=values.to(acc), mode="sum")

    @staticmethod
    def backward(ctx, g):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = _gather_dot(indices, g, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            seg = LatentSegments(indices, W_dec.shape[0])
            if ctx.shared is not None:  # the encoder's backward, next, selected the same latents
                ctx.shared["segments"] = (indices.data_ptr(), tuple(indices.shape), seg)
            grad_W = seg.matmul(values, g).to(W_dec.dtype)
        return grad_values, None, grad_W, None


def topk_encode(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, aux_mask: Tensor | None = None,
                k_aux: int = 0, b_dec: Tensor | None = None,
                shared: dict | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sparse top-k ReLU encoder.

    Args:
        x_c: (batch, d_in) centred input (x - b_dec), or the input x itself when `b_dec` is given.
        W_enc: (d_sae, d_in); b_enc: (d_sae,).
        k: latents kept per row.
        aux_mask: optional (d_sae,) bool, latents eligible for the AuxK selection (the dead ones).
        k_aux: AuxK latents per row (0 disables it).
        b_dec: optional (d_in,) pre-encoder bias subtracted here. Its gradient is then one product,
            -(db_enc @ W_enc), instead of a (batch, d_in) input gradient summed over the batch.
        shared: a fresh dict also given to `sparse_decode` of these codes: the backward then groups
            the selected (row, slot) pairs by latent once for both weight gradients.

    Returns:
        values (batch, k) >= 0, indices (batch, k) int64, aux_values (batch, k_aux), aux_indices.
    """
    if aux_mask is None:
        k_aux = 0
    return _TopKEncode.apply(x_c, b_dec, W_enc, b_enc, k, aux_mask, k_aux, shared)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, *, shared: dict | None = None) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]], shape (batch, d_in), differentiable in values and W_dec.

    `shared`: the dict given to `topk_encode` for these codes (see there)."""
    if values.shape[1] == 0:
        return values.new_zeros((values.shape[0], W_dec.shape[1]))
    return _SparseDecode.apply(values, indices, W_dec, shared)
