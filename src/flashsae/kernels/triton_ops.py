"""Triton fast path of the sparse kernels, with the signatures of `flashsae.kernels.reference`.

`flashsae.kernels` imports this module lazily, per call, so installs without triton never load it.
Kernels run on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1` (tests; it must be set
before this module is first imported). Imports torch and triton only.

Four kernels, each accumulating in fp32 and storing in the output's dtype (fp32 or bf16 inputs):

- gather-sum   out[t] = sum_i w[t, i] * R[idx[t, i]]: decoder forward, encoder input gradient.
- gather-dot   out[t, i] = <g[t], R[idx[t, i]]>: decoder gradient to the codes.
- segment-sum  out[j] = sum over pairs (t, i) with idx[t, i] = j of w[t, i] * S[t], plus
               sum[j] = sum of those w[t, i]: decoder and encoder weight gradients and the encoder
               bias gradient. The (token, slot) pairs are sorted by latent first (CSR), so each
               program owns one latent row: no atomics (bf16 atomics lose precision),
               deterministic, fp32 accumulation.
- group max    per-row maxima of groups of `GROUP` latents, first stage of the exact top-k.

Slots whose code value is 0 (ReLU-clipped, or AuxK slots left without a dead latent) are skipped by
all three sparse kernels: their rows are not loaded, and the pair sort puts them after every latent,
so no segment walks them (ties among such slots once sent thousands of pairs to one latent).

bf16 codes with many more (row, latent) pairs than latents gather from a bf16 working copy of W_dec,
made once per forward (`BF16_ROWS_AFTER`); W_dec's gradient is still summed and stored in float32.

Kernels launch under the device of their tensors (`torch.cuda.device`), so a model on cuda:1 works
whatever the current device. Indices must lie in [0, d_sae) (not checked: checking costs a host
sync). Block sizes are fixed heuristics that have not been tuned on a GPU yet; `python -m
bench.kernels` measures them.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from flashsae.kernels import auxk, reference
from flashsae.kernels.auxk import DeadLatents

GROUP = 64
"""Latents per group of the group-max prefilter (a power of two)."""

MIN_GROUPED_LATENTS = 8192
"""Below this many latents `torch.topk` runs alone (the prefilter's extra passes are not worth it;
threshold not measured yet)."""


@triton.jit
def _gather_sum_kernel(w_ptr, idx_ptr, rows_ptr, out_ptr, n_tok, k, d,
                       stride_w, stride_idx, stride_rows, stride_out,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (block of BLOCK_T tokens, block of BLOCK_D columns); loops over the k slots.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < n_tok
    mask = t_ok[:, None] & (cols < d)[None, :]
    t = t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for i in range(0, k):
        j = tl.load(idx_ptr + t * stride_idx + i, mask=t_ok, other=0).to(tl.int64)
        a = tl.load(w_ptr + t * stride_w + i, mask=t_ok, other=0.0).to(tl.float32)
        r = tl.load(rows_ptr + j[:, None] * stride_rows + cols[None, :], mask=mask & (a != 0)[:, None], other=0.0)
        acc += a[:, None] * r.to(tl.float32)
    tl.store(out_ptr + t[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_dot_kernel(g_ptr, idx_ptr, v_ptr, rows_ptr, out_ptr, n_tok, d,
                       stride_g, stride_idx, stride_v, stride_rows, stride_out,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (block of BLOCK_T tokens, slot i); loops over d. Slots of code value 0 give 0.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.program_id(1)
    t_ok = t < n_tok
    t = t.to(tl.int64)
    j = tl.load(idx_ptr + t * stride_idx + i, mask=t_ok, other=0).to(tl.int64)
    t_ok = t_ok & (tl.load(v_ptr + t * stride_v + i, mask=t_ok, other=0.0) != 0)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = t_ok[:, None] & (cols < d)[None, :]
        g = tl.load(g_ptr + t[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rows_ptr + j[:, None] * stride_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * r, axis=1)
    tl.store(out_ptr + t * stride_out + i, acc.to(out_ptr.dtype.element_ty), mask=t < n_tok)


@triton.jit
def _segment_sum_kernel(pairs_ptr, offsets_ptr, w_ptr, src_ptr, out_ptr, sum_ptr, k, d,
                        stride_src, stride_out,
                        HAS_ROWS: tl.constexpr, HAS_SUM: tl.constexpr, ACCUMULATE: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (latent j, block of BLOCK_D columns) walks the pairs of latent j in order;
    # ACCUMULATE adds to what the outputs hold (a second set of pairs, e.g. the AuxK ones).
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < d
    start = tl.load(offsets_ptr + j)
    end = tl.load(offsets_ptr + j + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    total = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_ok = e < end
        pair = tl.load(pairs_ptr + e, mask=e_ok, other=0).to(tl.int64)
        a = tl.load(w_ptr + pair, mask=e_ok, other=0.0).to(tl.float32)
        if HAS_ROWS:
            t = pair // k
            s = tl.load(src_ptr + t[:, None] * stride_src + cols[None, :],
                        mask=e_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a[:, None] * s, axis=0)
        if HAS_SUM:
            total += a
    if HAS_ROWS:
        out = out_ptr + j.to(tl.int64) * stride_out + cols
        if ACCUMULATE:
            acc += tl.load(out, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=c_ok)
    if HAS_SUM:
        if tl.program_id(1) == 0:
            s = tl.sum(total, axis=0)
            if ACCUMULATE:
                s += tl.load(sum_ptr + j).to(tl.float32)
            tl.store(sum_ptr + j, s.to(sum_ptr.dtype.element_ty))


@triton.jit
def _group_max_kernel(x_ptr, out_ptr, n, n_groups, stride_x, stride_out,
                      G: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    # One program per (row, block of BLOCK_GROUPS groups); the ragged last group is padded with -inf.
    row = tl.program_id(0).to(tl.int64)
    gid = tl.program_id(1) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    cols = gid[:, None] * G + tl.arange(0, G)[None, :]
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf"))
    tl.store(out_ptr + row * stride_out + gid, tl.max(x, axis=1), mask=gid < n_groups)


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(max(d, 1)), 128)


def _launch_device(t: Tensor):
    """Context that makes t's GPU current: Triton launches on the current device, not the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _gather_sum(weights: Tensor, idx: Tensor, rows: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[t] = sum_i weights[t, i] * rows[idx[t, i]]: (n_tok, d) in out_dtype; zero weights skipped."""
    n_tok, k = idx.shape
    d = rows.shape[1]
    out = torch.empty((n_tok, d), dtype=out_dtype, device=rows.device)
    if k == 0:
        return out.zero_()
    if n_tok == 0 or d == 0:
        return out
    block_t, block_d = 16, _block_d(d)
    grid = (triton.cdiv(n_tok, block_t), triton.cdiv(d, block_d))
    with _launch_device(rows):
        _gather_sum_kernel[grid](weights, idx, rows, out, n_tok, k, d,
                                 weights.stride(0), idx.stride(0), rows.stride(0), out.stride(0),
                                 BLOCK_T=block_t, BLOCK_D=block_d)
    return out


def _gather_dot(g: Tensor, idx: Tensor, values: Tensor, rows: Tensor, out_dtype: torch.dtype) -> Tensor:
    """out[t, i] = <g[t], rows[idx[t, i]]>, 0 where values[t, i] == 0: (n_tok, k) in out_dtype."""
    n_tok, k = idx.shape
    d = rows.shape[1]
    out = torch.empty((n_tok, k), dtype=out_dtype, device=rows.device)
    if d == 0:
        return out.zero_()
    if n_tok == 0 or k == 0:
        return out
    block_t, block_d = 16, _block_d(d)
    with _launch_device(rows):
        _gather_dot_kernel[(triton.cdiv(n_tok, block_t), k)](
            g, idx, values, rows, out, n_tok, d, g.stride(0), idx.stride(0), values.stride(0), rows.stride(0),
            out.stride(0), BLOCK_T=block_t, BLOCK_D=block_d)
    return out


def _pairs_by_latent(idx: Tensor, weights: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    """Sort the (token, slot) pairs of idx (n_tok, k) by latent, those of zero weight last.

    Returns (pairs, offsets): flat pair ids t * k + i in latent order (stable, hence deterministic)
    and (n_latents + 1,) offsets, latent j owning pairs[offsets[j]:offsets[j + 1]]. Zero-weight pairs
    sit past offsets[n_latents], where no segment reaches.
    """
    flat = idx.reshape(-1)
    if n_latents < 2**31 - 1:
        flat = flat.to(torch.int32)  # int32 sort keys: half the bytes of int64
    keys = torch.where(weights.reshape(-1) != 0, flat, n_latents)
    latents, pairs = torch.sort(keys, stable=True)
    bounds = torch.arange(n_latents + 1, dtype=latents.dtype, device=idx.device)
    return pairs, torch.searchsorted(latents, bounds)


def _segment_sum(pairs: Tensor, offsets: Tensor, weights: Tensor, src: Tensor, n_latents: int, *,
                 rows_out: Tensor | None, sums_out: Tensor | None, accumulate: bool = False) -> None:
    """Per latent j, into rows_out (n_latents, d): sum of weights[t, i] * src[t]; into sums_out
    (n_latents,): sum of weights[t, i]. None skips that output; `accumulate` adds to what they hold.

    `pairs`, `offsets` come from `_pairs_by_latent` of the same (n_tok, k) codes as `weights`.
    """
    k = weights.shape[1]
    d = src.shape[1]
    has_rows = rows_out is not None and d > 0
    if n_latents == 0 or not (has_rows or sums_out is not None):
        return
    block_d = _block_d(d)
    grid = (n_latents, triton.cdiv(d, block_d) if has_rows else 1)
    dummy = offsets  # never touched when its flag is off
    with _launch_device(src):
        _segment_sum_kernel[grid](pairs, offsets, weights, src, rows_out if has_rows else dummy,
                                  sums_out if sums_out is not None else dummy, max(k, 1), d,
                                  src.stride(0), rows_out.stride(0) if has_rows else 0,
                                  HAS_ROWS=has_rows, HAS_SUM=sums_out is not None, ACCUMULATE=accumulate,
                                  BLOCK_E=16, BLOCK_D=block_d)


def _shared_pairs(shared: dict | None, indices: Tensor, values: Tensor):
    """The decoder backward's (pairs, offsets) of these very codes, when it made them."""
    if shared is None:
        return None
    return shared.get("pairs", {}).pop((indices.data_ptr(), values.data_ptr(), tuple(indices.shape)), None)


def group_maxima(scores: Tensor, group: int) -> Tensor:
    """Per-row maxima of consecutive groups of `group` columns: (rows, ceil(n / group)), scores' dtype."""
    scores = scores.contiguous()
    n_rows, n = scores.shape
    n_groups = triton.cdiv(n, group)
    out = torch.empty((n_rows, n_groups), dtype=scores.dtype, device=scores.device)
    if n_rows == 0 or n_groups == 0:
        return out
    block_groups = min(triton.next_power_of_2(n_groups), max(1, 2048 // group))
    grid = (n_rows, triton.cdiv(n_groups, block_groups))
    with _launch_device(scores):
        _group_max_kernel[grid](scores, out, n, n_groups, scores.stride(0), out.stride(0),
                                G=group, BLOCK_GROUPS=block_groups)
    return out


def select_topk(scores: Tensor, k: int, *, group: int | None = None,
                min_latents: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact per-row top-k of scores (rows, n): (values, indices), each (rows, k), unsorted.

    Group-max prefilter: keep the k groups with the largest maxima, then the top-k
    of their k * group candidates. Exact: an element of the row's top-k outside the kept groups
    would be <= each kept group's maximum, so the kept groups already hold k elements at least as
    large. Ties may pick different indices than `torch.topk`, never different values. Falls back
    to `torch.topk` when n < min_latents or there are fewer than 2k groups. Entries of -inf may be
    returned with any in-range index (as with `torch.topk`). `group` and `min_latents` default to
    the module's `GROUP` and `MIN_GROUPED_LATENTS`, read per call.
    """
    group = GROUP if group is None else group
    min_latents = MIN_GROUPED_LATENTS if min_latents is None else min_latents
    n_rows, n = scores.shape
    n_groups = triton.cdiv(n, group)
    if n < min_latents or n_groups < 2 * k or n_rows == 0:
        return scores.topk(k, dim=-1, sorted=False)
    scores = scores.contiguous()
    _, top_groups = group_maxima(scores, group).topk(k, dim=-1, sorted=False)  # (rows, k)
    if n % group:
        scores = F.pad(scores, (0, n_groups * group - n), value=float("-inf"))
    candidates = scores.view(n_rows, n_groups, group).gather(
        1, top_groups.unsqueeze(-1).expand(-1, -1, group)).view(n_rows, k * group)
    values, pos = candidates.topk(k, dim=-1, sorted=False)
    indices = top_groups.gather(1, pos // group) * group + pos % group
    return values, indices.clamp_max_(n - 1)  # a padding slot can win only with value -inf


BF16_ROWS_AFTER = 2
"""bf16 codes read a bf16 copy of W_dec when their (row, latent) pairs exceed this many times W_dec's
rows. The copy costs one pass over W_dec (4 bytes read and 2 written per weight); the forward gather
and the backward gather-dot each read 2 bytes fewer per weight of each pair's row, so it pays for
itself once the pairs outnumber 1.5x the latents. Not yet measured on a GPU."""


def _rows_read(values: Tensor, indices: Tensor, W_dec: Tensor, shared: dict | None) -> Tensor:
    """The decoder rows the gathers read: W_dec, or for bf16 codes with many pairs its bf16 working copy,
    made once per forward for every decode in it (`shared`, the dict of one forward pass, in which the
    weights do not change)."""
    if values.dtype != torch.bfloat16 or W_dec.dtype != torch.float32 \
            or indices.numel() <= BF16_ROWS_AFTER * W_dec.shape[0]:
        return W_dec
    key = W_dec.data_ptr()
    copies = shared.setdefault("bf16_rows", {}) if shared is not None else {}
    if key not in copies:
        copies[key] = W_dec.detach().to(torch.bfloat16)
    return copies[key]


class _SparseDecode(torch.autograd.Function):
    """Gather-sum forward; backward: gather-dot to the values, segment-sum to W_dec. Zero values skipped.
    bf16 codes gather from a bf16 working copy of W_dec when that moves fewer bytes (`_rows_read`)."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, shared):
        values, indices, W_dec = values.contiguous(), indices.contiguous(), W_dec.contiguous()
        rows = _rows_read(values, indices, W_dec, shared)
        ctx.save_for_backward(values, indices, rows)
        ctx.shared, ctx.W_shape, ctx.W_dtype = shared, W_dec.shape, W_dec.dtype
        return _gather_sum(values, indices, rows, values.dtype)

    @staticmethod
    def backward(ctx, g):
        values, indices, rows = ctx.saved_tensors
        g = g.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = _gather_dot(g, indices, values, rows, values.dtype)
        if ctx.needs_input_grad[2]:
            pairs, offsets = _pairs_by_latent(indices, values, ctx.W_shape[0])
            if ctx.shared is not None:  # the encoder's backward, next, selected the same latents: sort once
                ctx.shared.setdefault("pairs", {})[(indices.data_ptr(), values.data_ptr(), tuple(indices.shape))] = \
                    (pairs, offsets)
            grad_W = torch.empty(ctx.W_shape, dtype=ctx.W_dtype, device=g.device)
            _segment_sum(pairs, offsets, values, g, ctx.W_shape[0], rows_out=grad_W, sums_out=None)
        return grad_values, None, grad_W, None


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, *, shared: dict | None = None) -> Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]], shape (batch, d_in), differentiable in values and W_dec;
    zero values skipped (see `reference.sparse_decode`)."""
    if values.shape[1] == 0:
        return values.new_zeros((values.shape[0], W_dec.shape[1]))
    if auxk.same_ids(indices):  # the same latents in every row: one matrix product
        return reference.block_decode(values, indices[0], W_dec)
    return _SparseDecode.apply(values, indices, W_dec, shared)


class _TopKEncode(torch.autograd.Function):
    """Forward as `reference._TopKEncode` with the group-max selection; sparse Triton backward."""

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k, dead, k_aux, shared):
        x_c = x - b_dec if b_dec is not None else x
        pre = torch.addmm(b_enc.to(x_c.dtype), x_c, W_enc.to(x_c.dtype).t())  # (batch, d_sae)
        top, idx = select_topk(pre, k)
        values = top.clamp_min(0)
        k_aux = dead.k_aux(k_aux) if dead is not None else 0
        if k_aux:
            atop, aidx = auxk.select(pre[:dead.n_rows(pre.shape[0])], dead, k_aux, select_topk,
                                     in_place=True)  # pre is no longer needed
            aux_values = atop.clamp_min(0)
        else:
            aidx = idx.new_zeros((x_c.shape[0], 0))
            aux_values = values.new_zeros((x_c.shape[0], 0))
        ctx.save_for_backward(x_c, W_enc, idx, values, aidx, aux_values)
        ctx.b_dtype = b_enc.dtype
        ctx.shared = shared
        ctx.mark_non_differentiable(idx, aidx)
        return values, idx, aux_values, aidx

    @staticmethod
    def backward(ctx, g_values, _g_idx, g_aux, _g_aidx):
        x_c, W_enc, idx, values, aidx, aux_values = ctx.saved_tensors
        # AuxK pairs join the same backward so the auxiliary loss trains the encoder (as OpenAI's
        # train.py does; sparsify's fused encoder drops it).
        codes = [(idx, values, torch.where(values > 0, g_values, 0))]  # ReLU
        x_c, W_enc = x_c.contiguous(), W_enc.contiguous()
        block = None  # AuxK codes holding every candidate in every row: a dense block, matrix products
        if aidx.shape[1] > 0 and g_aux is not None:
            g_a = torch.where(aux_values > 0, g_aux, 0)
            if auxk.same_ids(aidx):
                block = auxk.block_grads(g_a, aidx[0], x_c, W_enc, need_x=ctx.needs_input_grad[0])
            else:
                codes.append((aidx, aux_values, g_a))
        n_latents = W_enc.shape[0]
        grad_x = grad_b_dec = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gather_sum(codes[0][2].contiguous(), idx.contiguous(), W_enc, torch.float32)
            for i, _, g in codes[1:]:  # the AuxK rows: the first ones
                grad_x[:i.shape[0]] += _gather_sum(g.contiguous(), i.contiguous(), W_enc, torch.float32)
            if block is not None:
                grad_x[:block[0].shape[0]] += block[0]
            grad_x = grad_x.to(x_c.dtype)
        need_W, need_sum = ctx.needs_input_grad[2], ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        if need_W or need_sum:
            grad_W = torch.empty_like(W_enc) if need_W else None
            g_sum = torch.empty(n_latents, dtype=torch.float32, device=W_enc.device) if need_sum else None
            for n, (i, v, g) in enumerate(codes):  # the top-k pairs, then the AuxK pairs: each sorted once a step
                i, v, g = i.contiguous(), v.contiguous(), g.contiguous()
                pairs, offsets = _shared_pairs(ctx.shared, i, v) or _pairs_by_latent(i, v, n_latents)
                _segment_sum(pairs, offsets, g, x_c, n_latents, rows_out=grad_W, sums_out=g_sum, accumulate=n > 0)
            if block is not None:
                if need_W:
                    grad_W.index_add_(0, aidx[0], block[1].to(grad_W.dtype))
                if need_sum:
                    g_sum.index_add_(0, aidx[0], block[2])
            if need_sum:
                grad_b = g_sum.to(ctx.b_dtype) if ctx.needs_input_grad[3] else None
                if ctx.needs_input_grad[1]:  # sum over rows of -dx_c: one product, no (batch, d_in) gradient
                    grad_b_dec = -(g_sum @ W_enc.float()).to(x_c.dtype)
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None


def topk_encode(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, aux_mask: Tensor | DeadLatents | None = None,
                k_aux: int = 0, b_dec: Tensor | None = None,
                shared: dict | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sparse top-k ReLU encoder; arguments and results as `reference.topk_encode`."""
    dead = DeadLatents.of(aux_mask) if aux_mask is not None and k_aux > 0 else None
    return _TopKEncode.apply(x_c, b_dec, W_enc, b_enc, k, dead, k_aux, shared)
