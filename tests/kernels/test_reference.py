"""The sparse top-k path against a dense autograd computation of the same function."""
import pytest
import torch

from flashsae import kernels
from flashsae.kernels import reference


def dense_topk(x_c, W_enc, b_enc, k):
    pre = x_c @ W_enc.T + b_enc
    top, idx = pre.topk(k, dim=-1)
    return torch.relu(top), idx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 runs the compiled CPU top-k
@pytest.mark.parametrize("inner_b_dec", [False, True])  # x - b_dec outside, or b_dec given to the encoder
@pytest.mark.parametrize("batch,d,n,k", [(7, 13, 50, 1), (33, 24, 97, 5), (64, 65, 128, 16), (40, 20, 512, 32)])
def test_topk_encode_and_decode_match_dense(batch, d, n, k, inner_b_dec, dtype):
    torch.manual_seed(batch)
    x = torch.randn(batch, d, dtype=dtype, requires_grad=True)
    W_enc = torch.randn(n, d, dtype=dtype, requires_grad=True)
    b_enc = torch.randn(n, dtype=dtype, requires_grad=True)
    b_dec = torch.randn(d, dtype=dtype, requires_grad=True)
    W_dec = torch.randn(n, d, dtype=dtype, requires_grad=True)
    target = torch.randn(batch, d, dtype=dtype)
    params = [x, W_enc, b_enc, b_dec, W_dec]

    def loss_of(values, idx):
        x_hat = reference.sparse_decode(values, idx, W_dec) + b_dec
        return (x_hat - target).pow(2).sum()

    if inner_b_dec:
        values, idx, _, _ = reference.topk_encode(x, W_enc, b_enc, k, b_dec=b_dec)
    else:
        values, idx, _, _ = reference.topk_encode(x - b_dec, W_enc, b_enc, k)
    loss = loss_of(values, idx)
    grads = torch.autograd.grad(loss, params)
    # and without a gradient for x, as in training: b_dec's gradient then comes from one product
    x_fixed = x.detach()
    values2, idx2, _, _ = (reference.topk_encode(x_fixed, W_enc, b_enc, k, b_dec=b_dec) if inner_b_dec
                           else reference.topk_encode(x_fixed - b_dec, W_enc, b_enc, k))
    grads2 = torch.autograd.grad(loss_of(values2, idx2), params[1:])

    dv, di = dense_topk(x - b_dec, W_enc, b_enc, k)
    codes = torch.zeros(batch, n, dtype=dtype).scatter(1, di, dv)
    dense_loss = ((codes @ W_dec + b_dec) - target).pow(2).sum()
    dense_grads = torch.autograd.grad(dense_loss, params)

    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert torch.allclose(loss, dense_loss, rtol=tol)
    for g, ref in [*zip(grads, dense_grads), *zip(grads2, dense_grads[1:])]:
        assert torch.allclose(g, ref, atol=tol * max(1.0, ref.abs().max().item())), \
            (g.shape, (g - ref).abs().max(), ref.abs().max())


def test_auxk_candidates_are_dead_latents_and_train_the_encoder():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    W_enc = torch.randn(40, 8, requires_grad=True)
    b_enc = torch.zeros(40, requires_grad=True)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[30:] = True
    values, idx, aux_values, aux_idx = reference.topk_encode(x, W_enc, b_enc, 4, aux_mask=dead, k_aux=3)
    assert aux_idx.shape == (16, 3)
    assert bool((aux_idx >= 30).all())
    aux_values.sum().backward()
    assert W_enc.grad[30:].abs().sum() > 0          # the auxiliary loss reaches dead latents' encoder rows
    assert W_enc.grad[:30].abs().sum() == 0


# every: 4 dead latents and one that fired since among 5 candidates, k_aux 5 takes them all (a dense block)
@pytest.mark.parametrize("every", [False, True])
# one block of rows; three, the AuxK rows ending in the second
@pytest.mark.parametrize("batch,rows", [(40, 17), (1100, 700)])
def test_auxk_on_the_first_rows_matches_dense(monkeypatch, batch, rows, every):
    """DeadLatents.rows: AuxK codes for the batch's first rows only, and gradients as dense autograd gives."""
    from flashsae.kernels import auxk

    monkeypatch.setattr(reference, "_BLOCK_BYTES", 1)  # blocks of 512 rows
    torch.manual_seed(rows)
    d, n, k, k_aux = 12, 60, 3, 5
    built = []
    original = reference.LatentSegments.__init__
    monkeypatch.setattr(reference.LatentSegments, "__init__",
                        lambda self, *a, **kw: built.append(1) or original(self, *a, **kw))
    x = torch.randn(batch, d, dtype=torch.float64)
    params = [torch.randn(n, d, dtype=torch.float64, requires_grad=True),  # W_enc
              torch.randn(n, dtype=torch.float64, requires_grad=True),     # b_enc
              torch.randn(d, dtype=torch.float64, requires_grad=True),     # b_dec
              torch.randn(n, d, dtype=torch.float64, requires_grad=True)]  # W_dec
    W_enc, b_enc, b_dec, W_dec = params
    mask = torch.zeros(n, dtype=torch.bool)
    ids = torch.randperm(n)
    mask[ids[:4 if every else 20]] = True
    dead = auxk.DeadLatents(mask, ids[:5] if every else torch.arange(n), rows)
    values, idx, aux_values, aux_idx = reference.topk_encode(x, W_enc, b_enc, k, aux_mask=dead, k_aux=k_aux,
                                                             b_dec=b_dec)
    assert values.shape == (batch, k) and aux_values.shape == aux_idx.shape == (rows, k_aux)
    assert auxk.same_ids(aux_idx) == every
    assert bool(mask[aux_idx].all()) if not every else bool(((aux_values == 0) | mask[aux_idx]).all())
    r = torch.randn(batch, d, dtype=torch.float64)
    loss = ((reference.sparse_decode(values, idx, W_dec) + b_dec - x).pow(2).sum()
            + (reference.sparse_decode(aux_values, aux_idx, W_dec) - r[:rows]).pow(2).sum())
    got = torch.autograd.grad(loss, params)

    pre = (x - b_dec) @ W_enc.T + b_enc
    top, top_idx = pre.topk(k, dim=-1)
    atop, atop_idx = pre[:rows].masked_fill(~mask, float("-inf")).topk(k_aux, dim=-1)
    dense = torch.zeros_like(pre).scatter(1, top_idx, top.relu())
    dense_aux = torch.zeros_like(pre[:rows]).scatter(1, atop_idx, atop.relu())
    want_loss = (dense @ W_dec + b_dec - x).pow(2).sum() + (dense_aux @ W_dec - r[:rows]).pow(2).sum()
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # every backward groups its codes by latent (no shared dict here), except a dense block's
    assert len(built) == (2 if every else 4)


def test_a_dense_block_of_codes_decodes_as_the_gather_sum():
    """Codes holding the same latents in every row: one matrix product, the gather-sum's value and
    gradients (zero-value slots get none), under bf16 autocast too."""
    from flashsae.kernels import auxk

    torch.manual_seed(6)
    ids = torch.tensor([7, 2, 11])
    values = torch.rand(9, 3)
    values[:, 1] = 0  # a candidate that fired since the list was made
    W = torch.randn(12, 5, requires_grad=True)
    block = ids.expand(9, -1)
    assert auxk.same_ids(block) and not auxk.same_ids(block.contiguous())
    g = torch.randn(9, 5)
    for autocast in (False, True):
        results = []
        for idx in (block, block.contiguous()):  # the block; the same codes through the gather-sum
            v = values.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = reference.sparse_decode(v, idx, W)
            assert out.dtype == torch.float32
            out.backward(g)
            results.append((out.detach(), v.grad, W.grad.clone()))
            W.grad = None
        for got, want in zip(*results):
            torch.testing.assert_close(got, want)
        assert bool((results[0][1][:, 1] == 0).all())


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("FLASHSAE_KERNELS", raising=False)
    assert kernels.selection.impl(torch.device("cpu")) == "reference"
    monkeypatch.setenv("FLASHSAE_KERNELS", "reference")
    assert kernels.selection.impl(torch.device("cuda")) == "reference"


def test_decoder_and_encoder_backward_group_the_latents_once(monkeypatch):
    torch.manual_seed(3)
    x = torch.randn(50, 12)
    params = [torch.randn(64, 12, requires_grad=True), torch.randn(64, requires_grad=True),
              torch.randn(12, requires_grad=True), torch.randn(64, 12, requires_grad=True)]
    built = []
    original = reference.LatentSegments.__init__

    def counting(self, *a, **k):
        built.append(1)
        original(self, *a, **k)

    monkeypatch.setattr(reference.LatentSegments, "__init__", counting)

    def grads(shared):
        W_enc, b_enc, b_dec, W_dec = params
        values, idx, _, _ = reference.topk_encode(x, W_enc, b_enc, 5, b_dec=b_dec, shared=shared)
        loss = (reference.sparse_decode(values, idx, W_dec, shared=shared) + b_dec - x).pow(2).sum()
        return torch.autograd.grad(loss, params)

    built.clear()
    alone = grads(None)
    assert len(built) == 2
    built.clear()
    together = grads({})
    assert len(built) == 1
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_decoder_and_encoder_backward_group_the_auxk_latents_once_too(monkeypatch):
    torch.manual_seed(4)
    x = torch.randn(50, 12)
    W_enc, b_enc, b_dec, W_dec = params = [torch.randn(64, 12, requires_grad=True), torch.randn(64, requires_grad=True),
                                           torch.randn(12, requires_grad=True), torch.randn(64, 12, requires_grad=True)]
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    built = []
    original = reference.LatentSegments.__init__
    monkeypatch.setattr(reference.LatentSegments, "__init__",
                        lambda self, *a, **k: built.append(1) or original(self, *a, **k))

    def grads(shared):
        values, idx, aux_values, aux_idx = reference.topk_encode(x, W_enc, b_enc, 5, b_dec=b_dec, shared=shared,
                                                                 aux_mask=dead, k_aux=6)
        loss = (reference.sparse_decode(values, idx, W_dec, shared=shared) + b_dec - x).pow(2).sum()
        loss = loss + (reference.sparse_decode(aux_values, aux_idx, W_dec, shared=shared) - x).pow(2).sum()
        return torch.autograd.grad(loss, params)

    built.clear()
    alone = grads(None)
    assert len(built) == 4  # each decoder backward and the encoder's, for the top-k and the AuxK codes
    built.clear()
    together = grads({})
    assert len(built) == 2  # one sort each
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_zero_value_slots_are_never_read():
    """Rows reached only through slots of value 0 hold NaN: reading them would poison the result."""
    torch.manual_seed(5)
    values = torch.rand(9, 4, dtype=torch.float64)
    values[:, 3] = 0  # e.g. AuxK slots left without a dead latent, all on latent 7
    values[2, 1] = 0
    idx = torch.stack([torch.randperm(7)[:4] for _ in range(9)])
    idx[:, 3] = 7
    W = torch.randn(8, 5, dtype=torch.float64)
    W[7] = float("nan")
    W.requires_grad_()
    v = values.clone().requires_grad_()
    out = reference.sparse_decode(v, idx, W)
    want = torch.zeros(9, 8, dtype=torch.float64).scatter(1, idx, values)[:, :7] @ W.detach()[:7]
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    assert bool(torch.isfinite(v.grad).all()) and bool((v.grad[values == 0] == 0).all())
    assert bool((W.grad[7] == 0).all()) and bool(torch.isfinite(W.grad).all())


def test_latent_segments_leave_zero_weight_pairs_out():
    idx = torch.tensor([[0, 3], [3, 1], [3, 2]])
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 3.0]])  # latent 3: only zero-weight pairs
    seg = reference.LatentSegments(idx, 4, w)
    assert seg.crow.tolist() == [0, 1, 2, 3, 3]
    dense = torch.randn(3, 2)
    want = torch.stack([dense[0], 2 * dense[1], 3 * dense[2], torch.zeros(2)])
    torch.testing.assert_close(seg.matmul(w, dense), want)
    torch.testing.assert_close(seg.sum(w), torch.tensor([1.0, 2.0, 3.0, 0.0]))


@pytest.mark.parametrize("n_candidates", [4, 60, 200])  # gathered columns, and whole rows
def test_auxk_selection_among_candidates_matches_masked_topk(n_candidates):
    from flashsae.kernels import auxk

    torch.manual_seed(n_candidates)
    pre = torch.randn(13, 200)
    candidates = torch.randperm(200)[:n_candidates]
    mask = torch.zeros(200, dtype=torch.bool)
    mask[candidates[: max(1, n_candidates - 2)]] = True  # two candidates fired since the list was made
    dead = auxk.DeadLatents(mask, candidates)
    k_aux = dead.k_aux(6)
    values, idx = auxk.select(pre.clone(), dead, k_aux, lambda s, k: s.topk(k, dim=-1, sorted=False))
    want = pre.masked_fill(~mask, float("-inf")).topk(k_aux, dim=-1).values
    assert torch.equal(values.sort(-1).values, want.sort(-1).values)
    finite = torch.isfinite(values)
    assert bool(mask[idx[finite]].all()) and torch.equal(pre.gather(1, idx)[finite], values[finite])


@pytest.mark.parametrize("n,top", [(1, 4), (9000, 512), (9000, 40000), (70000, 4096)])  # radix; torch.sort twice
def test_the_latent_sort_is_torchs_stable_sort(n, top):
    keys = torch.randint(0, top + 1, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
    got_keys, got_order = reference._stable_sort(keys, top)
    want_keys, want_order = torch.sort(keys, stable=True)
    assert got_order.dtype == torch.int64 and torch.equal(got_order, want_order) and torch.equal(got_keys, want_keys)


@pytest.mark.parametrize("inner_b_dec", [False, True])
def test_inference_shortlisted_in_bf16_gives_the_float32_top_k(monkeypatch, inner_b_dec):
    """Without a gradient, on a CPU with bf16 units, the top-k is shortlisted from a bf16 product and
    finished in float32: the same latents and values as the float32 selection."""
    from flashsae.kernels import selection

    monkeypatch.setattr(selection, "_cpu_has_bf16", lambda: True)  # bf16 products run on any CPU, slower
    torch.manual_seed(3)
    x, W_enc, b_enc, b_dec = torch.randn(700, 48), torch.randn(600, 48) / 7, torch.randn(600) / 10, torch.randn(48)
    args = dict(b_dec=b_dec) if inner_b_dec else {}
    x_in = x if inner_b_dec else x - b_dec
    with torch.no_grad():
        assert reference._shortlist_applies(x_in, W_enc, b_enc, args.get("b_dec"), 12)
        got_v, got_i, aux_v, _ = reference.topk_encode(x_in, W_enc, b_enc, 12, **args)
        monkeypatch.setattr(reference, "SHORTLIST", False)
        want_v, want_i, _, _ = reference.topk_encode(x_in, W_enc, b_enc, 12, **args)
    assert aux_v.shape == (700, 0)
    got_i, order = got_i.sort(-1)
    want_i, want_order = want_i.sort(-1)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v.gather(1, order), want_v.gather(1, want_order), rtol=1e-5, atol=1e-6)
    # training (a gradient wanted) never takes it
    assert not reference._shortlist_applies(x_in, W_enc.requires_grad_(), b_enc, None, 12)
