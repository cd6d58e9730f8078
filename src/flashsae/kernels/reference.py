"""Plain-PyTorch specification of the sparse fast path (also the CPU production path).

Only the encoder product is dense. The decoder is a gather-sum of k rows per input and the
weight gradients touch only the selected latents (Gao et al., 2024; OpenAI sparse_autoencoder).
The weight gradients are segment sums over (row, slot) pairs sorted by latent, computed as a
gather-sum with the latents' segments as bags (`embedding_bag`). A CSR-by-dense product (MKL) was
8x faster than `index_add_` and the dense product here (d=256, 4096 latents, k=16, 4096 rows: 14 ms
against 110 ms and 320 ms on one core); the bags are 1.5-2x faster again. Slots whose code value is
0 are skipped by every function here (see `sparse_decode`): on the CPU they are dropped before any
row is read, which makes the data-dependent sizes this path may have and a GPU path must not.
On the CPU the top-k selection is the compiled `cpu_topk` kernel when it builds (torch.topk otherwise,
or with FLASHSAE_KERNELS=reference).
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flashsae.kernels import auxk, cpu_topk
from flashsae.kernels.auxk import DeadLatents
from flashsae.kernels.selection import native_bf16


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # accumulate bf16 inputs in fp32


_RADIX_BELOW = 65536
"""CPU sorts of fewer keys than this go to NumPy's radix sort when the keys fit in int16. PyTorch's
stable CPU sort costs 0.3-1 ms from ~4k to ~60k keys (8,192: 0.34 ms, 16,384: 0.78 ms; 65,536: 0.17-0.29
ms) where NumPy's int16 radix sort takes 0.02-0.05 ms (`python -m bench.micro_cpu`): a whole step at
small shapes, such as digits or AuxK's few rows."""


def _stable_sort(keys: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """`torch.sort(keys, stable=True)` of int32 keys in [0, top]: (sorted keys, int64 order)."""
    if keys.device.type == "cpu" and keys.numel() < _RADIX_BELOW and top < 2**15:
        order = torch.from_numpy(np.argsort(keys.numpy().astype(np.int16), kind="stable"))
        return keys.index_select(0, order), order
    return torch.sort(keys, stable=True)


class LatentSegments:
    """The (row, slot) pairs of an index matrix grouped by latent: latent j owns the pairs
    order[crow[j]:crow[j + 1]] (flat ids t * k + i, stable, hence deterministic).

    With `weights`, pairs of zero weight (ReLU-clipped codes, AuxK slots left without a dead latent)
    sort after every latent, so no segment holds them and the weight gradients never touch them.
    """

    def __init__(self, indices: Tensor, d_sae: int, weights: Tensor | None = None):
        flat = indices.reshape(-1)
        # int32 keys: PyTorch's parallel stable sort of int64 keys ran 100x slower here on 2 threads
        keys = flat.to(torch.int32, copy=True)
        if weights is not None:
            keys.masked_fill_(weights.reshape(-1) == 0, d_sae)
        self.sorted_keys, self.order = _stable_sort(keys, d_sae)
        self.crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=flat.device)
        torch.cumsum(torch.bincount(keys, minlength=d_sae + 1)[:d_sae], 0, out=self.crow[1:])
        self.rows = torch.div(self.order, indices.shape[1], rounding_mode="floor")
        self.shape = (indices.shape[0], indices.shape[1], d_sae)

    def matmul(self, weights: Tensor, dense: Tensor) -> Tensor:
        """out[j] = sum over the pairs (t, i) of latent j of weights[t, i] * dense[t]: (d_sae, dense columns).

        A gather-sum of dense's rows with the segments as bags (embedding_bag): 1.5-2.2x faster than
        MKL's CSR-by-dense product on one thread at 4096 rows, d=256, 4096 latents, k=16 to 128
        (`python -m bench.micro_cpu`), and the pairs past the last segment are never read.
        """
        acc = _acc_dtype(dense)
        w = weights.reshape(-1).index_select(0, self.order).to(acc)
        return F.embedding_bag(self.rows, dense.to(acc), self.crow, per_sample_weights=w, mode="sum",
                               include_last_offset=True)

    def gather_dot(self, g: Tensor, W: Tensor) -> Tensor:
        """out[t, i] = <g[t], W[indices[t, i]]> for the pairs of the segments, 0 for those left out:
        (rows, k), as a sampled dense product (SDDMM) at the latent-major pattern.

        Indices must be distinct within a row (true of top-k codes). 20x faster on the CPU than
        gathering the (batch, k, d_in) rows (measured: 9.7 ms against 198 ms at 4096 x 16 x 256), and
        in latent order it reuses this sort instead of sorting each row again.
        """
        acc = _acc_dtype(g)
        n_rows, k, d_sae = self.shape
        # The kept pairs are a prefix of the sorted ones; a data-dependent size, as in _kept.
        pos = (self.sorted_keys < d_sae).nonzero().squeeze(1)
        rows = self.rows.index_select(0, pos)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            zeros = torch.zeros(rows.shape[0], dtype=acc, device=g.device)
            pattern = torch.sparse_csr_tensor(self.crow, rows, zeros, size=(d_sae, n_rows), check_invariants=False)
            dots = torch.sparse.sampled_addmm(pattern, W.to(acc), g.to(acc).t(), beta=0.0).values()
        out = torch.zeros(n_rows * k, dtype=acc, device=g.device)
        return out.index_copy_(0, self.order.index_select(0, pos), dots).view(n_rows, k)

    def sum(self, weights: Tensor) -> Tensor:
        """out[j] = sum of weights over the pairs of latent j."""
        # prefix sums in fp64: differences stay exact enough
        w = weights.reshape(-1).index_select(0, self.order).double()
        csum = torch.zeros(w.numel() + 1, dtype=w.dtype, device=w.device)
        torch.cumsum(w, 0, out=csum[1:])
        return (csum[self.crow[1:]] - csum[self.crow[:-1]]).to(_acc_dtype(weights))


def _share_segments(shared: dict | None, indices: Tensor, values: Tensor, seg: LatentSegments) -> None:
    if shared is not None:
        shared.setdefault("segments", {})[(indices.data_ptr(), values.data_ptr(), tuple(indices.shape))] = seg


def _shared_segments(shared: dict | None, indices: Tensor, values: Tensor) -> LatentSegments | None:
    """The decoder backward's grouping of these very codes by latent, when it made one."""
    if shared is None:
        return None
    return shared.get("segments", {}).pop((indices.data_ptr(), values.data_ptr(), tuple(indices.shape)), None)


def _kept(kept: Tensor) -> tuple[Tensor, Tensor]:
    """(flat positions of the True entries of a (rows, k) mask, row-major; (rows + 1,) start of each
    row's among them). A data-dependent size: off the CPU this would read the count back (a host sync),
    and the reference is the CPU's path."""
    offsets = torch.zeros(kept.shape[0] + 1, dtype=torch.int64, device=kept.device)
    torch.cumsum(kept.sum(1), 0, out=offsets[1:])
    return kept.reshape(-1).nonzero().squeeze(1), offsets  # one nonzero, then 1-D index_select: 5x boolean indexing


def _gather_sum(weights: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """out[t] = sum_i weights[t, i] * W[indices[t, i]] (batch, d) in fp32 or wider; the slots of zero
    weight are dropped first (their rows are never read)."""
    acc = _acc_dtype(weights)
    pos, offsets = _kept(weights != 0)
    return F.embedding_bag(indices.reshape(-1).index_select(0, pos), W.to(acc), offsets,
                           per_sample_weights=weights.reshape(-1).index_select(0, pos).to(acc), mode="sum",
                           include_last_offset=True)


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
    def forward(ctx, x, b_dec, W_enc, b_enc, k, dead, k_aux, shared):
        x_c = x - b_dec if b_dec is not None else x
        ctx.shared = shared
        # The bias rides in the product as an extra input column of ones: addmm would first copy the
        # broadcast bias into the whole (batch, d_sae) output, a quarter of the GEMM's time on the CPU.
        dtype = torch.get_autocast_dtype(x_c.device.type) if torch.is_autocast_enabled(x_c.device.type) else x_c.dtype
        ones = torch.ones((x_c.shape[0], 1), dtype=dtype, device=x_c.device)
        x1 = torch.cat([x_c.to(dtype), ones], dim=1)
        W1 = torch.cat([W_enc.to(dtype), b_enc.to(dtype).unsqueeze(1)], dim=1)
        n_rows, d_sae = x_c.shape[0], W_enc.shape[0]
        k_aux = dead.k_aux(k_aux) if dead is not None else 0
        aux_rows = dead.n_rows(n_rows) if k_aux else n_rows
        top = torch.empty((n_rows, k), dtype=dtype, device=x_c.device)
        idx = torch.empty((n_rows, k), dtype=torch.int64, device=x_c.device)
        atop = torch.empty((aux_rows, k_aux), dtype=dtype, device=x_c.device)
        aidx = torch.empty((aux_rows, k_aux), dtype=torch.int64, device=x_c.device)
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
            if k_aux and start < aux_rows:  # after the top-k: pre is free to overwrite
                a_stop = min(stop, aux_rows)
                a_top, a_idx = auxk.select(pre[:a_stop - start], dead, k_aux, cpu_topk.topk, in_place=True)
                atop[start:a_stop] = a_top
                if auxk.same_ids(a_idx):  # every candidate taken: the same ids in every row, kept as a view
                    aidx = dead.candidates.expand(aux_rows, -1)
                else:
                    aidx[start:a_stop] = a_idx
        values = top.clamp_min(0)
        aux_values = atop.clamp_min(0)
        ctx.save_for_backward(x_c, W_enc, idx, values, aidx, aux_values)
        ctx.mark_non_differentiable(idx, aidx)
        return values, idx, aux_values, aidx

    @staticmethod
    def backward(ctx, g_values, _g_idx, g_aux, _g_aidx):
        x_c, W_enc, idx, values, aidx, aux_values = ctx.saved_tensors
        codes = [(idx, values, torch.where(values > 0, g_values, 0))]
        block = None  # AuxK codes holding every candidate in every row: a dense block, matrix products
        if aidx.shape[1] > 0 and g_aux is not None:
            g_a = torch.where(aux_values > 0, g_aux, 0)
            if auxk.same_ids(aidx):
                block = auxk.block_grads(g_a, aidx[0], x_c, W_enc, need_x=ctx.needs_input_grad[0])
            else:
                codes.append((aidx, aux_values, g_a))
        grad_x = grad_b_dec = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gather_sum(codes[0][2], idx, W_enc)
            for i, _, g in codes[1:]:  # the AuxK rows: the first ones
                grad_x[:i.shape[0]] += _gather_sum(g, i, W_enc)
            if block is not None:
                grad_x[:block[0].shape[0]] += block[0]
            grad_x = grad_x.to(x_c.dtype)
        if any(ctx.needs_input_grad[1:4]):
            W_parts, sum_parts = [], []
            for i, v, g in codes:  # the top-k pairs, then the AuxK pairs, each grouped once for the whole step
                seg = _shared_segments(ctx.shared, i, v) or LatentSegments(i, W_enc.shape[0], v)
                if ctx.needs_input_grad[2]:
                    W_parts.append(seg.matmul(g, x_c))
                if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
                    sum_parts.append(seg.sum(g))
            if W_parts:
                grad_W = W_parts[0]
                for part in W_parts[1:]:
                    grad_W += part
                if block is not None:
                    grad_W.index_add_(0, aidx[0], block[1])
                grad_W = grad_W.to(W_enc.dtype)
            if sum_parts:
                g_sum = sum(sum_parts)  # (d_sae,): the b_enc gradient
                if block is not None:
                    g_sum.index_add_(0, aidx[0], block[2].to(g_sum.dtype))
                grad_b = g_sum.to(W_enc.dtype) if ctx.needs_input_grad[3] else None
                if ctx.needs_input_grad[1]:  # sum over rows of -dx_c: one product, no (batch, d_in) gradient
                    acc = _acc_dtype(g_sum)
                    grad_b_dec = -(g_sum.to(acc) @ W_enc.to(acc)).to(x_c.dtype)
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """x_hat[t] = sum_i values[t, i] * W_dec[indices[t, i]]; gather-dot and segment-sum backward.

    Slots whose value is 0 are skipped everywhere (not read forward, zero gradient back)."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, shared):
        ctx.save_for_backward(values, indices, W_dec)
        ctx.shared = shared
        # In fp32 even under bf16 autocast: k rows per input are cheap to add exactly, and no bf16
        # copy of W_dec (or fp32 copy of the result for the loss) is needed.
        return _gather_sum(values, indices, W_dec)

    @staticmethod
    def backward(ctx, g):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            # One sort for both gradients here, and for the encoder's backward, next: it selected the same latents.
            seg = LatentSegments(indices, W_dec.shape[0], values)
            _share_segments(ctx.shared, indices, values, seg)
            if ctx.needs_input_grad[0]:
                grad_values = seg.gather_dot(g, W_dec).to(values.dtype)
            if ctx.needs_input_grad[2]:
                grad_W = seg.matmul(values, g).to(W_dec.dtype)
        return grad_values, None, grad_W, None


def topk_encode(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, aux_mask: Tensor | DeadLatents | None = None,
                k_aux: int = 0, b_dec: Tensor | None = None,
                shared: dict | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sparse top-k ReLU encoder.

    Args:
        x_c: (batch, d_in) centred input (x - b_dec), or the input x itself when `b_dec` is given.
        W_enc: (d_sae, d_in); b_enc: (d_sae,).
        k: latents kept per row.
        aux_mask: the latents eligible for the AuxK selection (the dead ones): a (d_sae,) bool mask,
            or `DeadLatents` with a short list of candidates that holds all of them (selection among
            those columns only, and at most one slot per candidate).
        k_aux: AuxK latents per row (0 disables it); capped at the number of candidates.
        b_dec: optional (d_in,) pre-encoder bias subtracted here. Its gradient is then one product,
            -(db_enc @ W_enc), instead of a (batch, d_in) input gradient summed over the batch.
        shared: a fresh dict also given to `sparse_decode` of these codes (and of the AuxK codes): the
            backward then groups the selected (row, slot) pairs by latent once for both weight gradients.

    Returns:
        values (batch, k) >= 0, indices (batch, k) int64, aux_values (batch, k_aux'), aux_indices, with
        k_aux' = min(k_aux, candidates). AuxK slots of value 0 (no dead latent left for them, or a
        negative pre-activation) are skipped by `sparse_decode` and by the backward.
    """
    dead = DeadLatents.of(aux_mask) if aux_mask is not None and k_aux > 0 else None
    if dead is None and _shortlist_applies(x_c, W_enc, b_enc, b_dec, k):
        return _shortlisted_topk(x_c if b_dec is None else x_c - b_dec, W_enc, b_enc, k)
    return _TopKEncode.apply(x_c, b_dec, W_enc, b_enc, k, dead, k_aux, shared)


SHORTLIST = True
"""Whether inference on a CPU with bf16 matrix units shortlists the top-k in bf16 (`_shortlisted_topk`)."""


def _shortlist_applies(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int) -> bool:
    """Float32 inference (no gradient, no autocast) on a CPU with bf16 matrix units, and a shortlist of
    2k latents shorter than the dictionary."""
    tensors = (x_c, W_enc, b_enc) if b_dec is None else (x_c, W_enc, b_enc, b_dec)
    return (SHORTLIST and x_c.device.type == "cpu" and 2 * k < W_enc.shape[0]
            and all(t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.is_autocast_enabled("cpu") and native_bf16(x_c.device))


def _shortlisted_topk(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The float32 top-k of x_c W_enc^T + b_enc per row, at about the cost of a bf16 product.

    The 2k largest pre-activations of a bf16 product are the candidates; their float32 values are then
    computed exactly (a sampled dense product) and the k largest kept. That is the float32 selection
    unless bf16 rounding (relative error ~2^-8 per product term) moves one of the k largest below k
    others: a near-tie, whose swap changes the reconstruction by about that rounding. On the 2-core
    AVX512-BF16 CPU a float32 product of 8,192 x 257 by 257 x 4,096 took 95 ms and the bf16 one 22 ms.
    """
    n_rows, d_sae = x_c.shape[0], W_enc.shape[0]
    c = 2 * k
    ones = torch.ones((n_rows, 1), dtype=torch.bfloat16, device=x_c.device)
    x1 = torch.cat([x_c.to(torch.bfloat16), ones], dim=1)
    W1 = torch.cat([W_enc.to(torch.bfloat16), b_enc.to(torch.bfloat16).unsqueeze(1)], dim=1)
    cand = torch.empty((n_rows, c), dtype=torch.int64, device=x_c.device)
    scratch = torch.empty((n_rows, c), dtype=torch.bfloat16, device=x_c.device)
    block = _row_block(n_rows, d_sae, torch.bfloat16, x_c.device)
    for start in range(0, n_rows, block):
        stop = min(start + block, n_rows)
        pre = _workspace(stop - start, d_sae, torch.bfloat16, x_c.device)
        torch.mm(x1[start:stop], W1.t(), out=pre)
        cpu_topk.topk(pre, c, out=(scratch[start:stop], cand[start:stop]))
    exact = LatentSegments(cand, d_sae).gather_dot(x_c, W_enc) + b_enc[cand]  # (rows, c) float32
    top, pos = cpu_topk.topk(exact, k)
    values, idx = top.clamp_min(0), cand.gather(1, pos)
    empty = values.new_zeros((n_rows, 0))
    return values, idx, empty, idx.new_zeros((n_rows, 0))


class _BlockDecode(torch.autograd.Function):
    """x_hat = values @ W_dec[ids]: the decode of codes holding latents `ids` in every row
    (`auxk.same_ids`), one matrix product instead of a gather-sum; zero values get zero gradient."""

    @staticmethod
    def forward(ctx, values, ids, W_dec):
        acc = _acc_dtype(values)
        with torch.autocast(values.device.type, enabled=False):
            W = W_dec.index_select(0, ids).to(acc)
            ctx.save_for_backward(values, ids, W)
            ctx.d_sae, ctx.W_dtype = W_dec.shape[0], W_dec.dtype
            return values.to(acc) @ W

    @staticmethod
    def backward(ctx, g):
        values, ids, W = ctx.saved_tensors
        grad_values = grad_W = None
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(W.dtype)
            if ctx.needs_input_grad[0]:
                grad_values = torch.where(values != 0, g @ W.t(), 0).to(values.dtype)
            if ctx.needs_input_grad[2]:
                grad_W = W.new_zeros((ctx.d_sae, W.shape[1])).index_copy_(0, ids, values.to(W.dtype).t() @ g)
                grad_W = grad_W.to(ctx.W_dtype)
        return grad_values, None, grad_W


def block_decode(values: Tensor, ids: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[:, j] * W_dec[ids[j]] for codes with the same (distinct) latent ids in every row:
    (batch, d_in) in float32 or wider, differentiable in values and W_dec."""
    return _BlockDecode.apply(values, ids, W_dec)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, *, shared: dict | None = None) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]], shape (batch, d_in), differentiable in values and W_dec.

    Slots whose value is 0 are skipped: not read, and their value's gradient is 0 (codes are ReLU
    outputs, whose gradient is zero there). `shared`: the dict given to `topk_encode` for these codes.
    Codes with the same latents in every row (`auxk.same_ids`) take one matrix product, `block_decode`."""
    if values.shape[1] == 0:
        return values.new_zeros((values.shape[0], W_dec.shape[1]))
    if auxk.same_ids(indices):
        return block_decode(values, indices[0], W_dec)
    return _SparseDecode.apply(values, indices, W_dec, shared)
