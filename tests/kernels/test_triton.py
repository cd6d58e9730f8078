"""Triton kernels against the plain-PyTorch reference: values and gradients on awkward shapes.

Runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set below before triton is
imported). With TRITON_INTERPRET=0 in the environment and a GPU present, the same tests run the
compiled kernels on CUDA tensors.
"""
import contextlib
import copy
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

from flashsae import kernels, models  # noqa: E402
from flashsae.config import TrainConfig  # noqa: E402
from flashsae.kernels import reference, triton_ops  # noqa: E402
from flashsae.train.trainer import Trainer  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def close(a, b, rtol=1e-5):
    """fp32 agreement relative to the tensor's largest entry (sums reorder, so not bitwise)."""
    scale = b.abs().max().clamp_min(1e-30)
    return bool(((a.float() - b.float()).abs().max() / scale) <= rtol)


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_()


def grads_of(fn, params):
    for p in params:
        p.grad = None
    out = fn()
    out.backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.fixture
def grouped(monkeypatch):
    """Route small problems through the group-max selection instead of the plain torch.topk fallback.

    Groups of 8 keep d_sae (one segment-sum program per latent) small for the interpreter; the
    selection with the real group size has its own tests below.
    """
    monkeypatch.setattr(triton_ops, "MIN_GROUPED_LATENTS", 0)
    monkeypatch.setattr(triton_ops, "GROUP", 8)


# ---- sparse_decode ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_tok,d,n,k", [(37, 24, 50, 1), (33, 65, 97, 5), (20, 100, 300, 13)])
def test_sparse_decode_matches_reference(n_tok, d, n, k):
    torch.manual_seed(n_tok + d)
    values = leaf(n_tok, k)
    W_dec = leaf(n, d)
    indices = torch.randint(0, n, (n_tok, k), device=DEVICE)
    indices[:, 0] = 3  # one latent with more pairs than a segment block, and repeats within a row
    target = torch.randn(n_tok, d, device=DEVICE)

    def loss(impl):
        return lambda: (impl.sparse_decode(values, indices, W_dec) - target).pow(2).sum()

    ref_loss, ref_grads = grads_of(loss(reference), [values, W_dec])
    tri_loss, tri_grads = grads_of(loss(triton_ops), [values, W_dec])
    assert close(tri_loss, ref_loss)
    for got, want in zip(tri_grads, ref_grads):
        assert close(got, want), (got - want).abs().max()


def test_sparse_decode_bf16_values_accumulate_in_fp32():
    torch.manual_seed(1)
    values = leaf(19, 7, dtype=torch.bfloat16)
    W_dec = leaf(40, 65)
    indices = torch.randint(0, 40, (19, 7), device=DEVICE)
    out = triton_ops.sparse_decode(values, indices, W_dec)
    assert out.dtype == torch.bfloat16
    exact = reference.sparse_decode(values.detach().double(), indices, W_dec.detach().double())
    # bf16 outputs: one rounding at the store, <= 1 ulp (2^-7 relative; the interpreter rounds toward
    # zero where a GPU rounds to nearest, so allow a whole ulp).
    assert close(out, exact, rtol=1e-2)
    g = torch.randn_like(out)
    out.backward(g)
    assert values.grad.dtype == torch.bfloat16 and W_dec.grad.dtype == torch.float32
    v, w = values.detach().double().requires_grad_(), W_dec.detach().double().requires_grad_()
    reference.sparse_decode(v, indices, w).backward(g.double())
    assert close(values.grad, v.grad, rtol=1e-2)
    assert close(W_dec.grad, w.grad)  # fp32 output: the bf16 inputs were summed in fp32


def test_bf16_codes_with_many_pairs_read_a_bf16_copy_of_the_decoder_made_once(monkeypatch):
    """More (row, latent) pairs than BF16_ROWS_AFTER x latents: the gathers read one bf16 copy of W_dec
    per forward (shared by every decode given the same dict); W_dec's gradient stays float32 and exact."""
    torch.manual_seed(3)
    n_tok, k, n, d = 24, 6, 40, 33  # 144 pairs > 2 x 40 latents
    values = leaf(n_tok, k, dtype=torch.bfloat16)
    W_dec = leaf(n, d)
    indices = torch.stack([torch.randperm(n, device=DEVICE)[:k] for _ in range(n_tok)])
    read = []
    gather = triton_ops._gather_sum
    monkeypatch.setattr(triton_ops, "_gather_sum",
                        lambda w, i, rows, dt: read.append(rows.dtype) or gather(w, i, rows, dt))
    shared = {}
    out = triton_ops.sparse_decode(values, indices, W_dec, shared=shared)
    again = triton_ops.sparse_decode(values, indices, W_dec, shared=shared)  # e.g. the AuxK codes
    assert read == [torch.bfloat16, torch.bfloat16] and len(shared["bf16_rows"]) == 1
    exact = reference.sparse_decode(values.detach().double(), indices, W_dec.detach().double())
    assert close(out, exact, rtol=1.5e-2)  # one bf16 rounding of W_dec, one of the output
    g = torch.randn_like(out)
    (out.float() * g).sum().backward()
    v, w = values.detach().double().requires_grad_(), W_dec.detach().double().requires_grad_()
    (reference.sparse_decode(v, indices, w) * g.double()).sum().backward()
    assert W_dec.grad.dtype == torch.float32 and close(W_dec.grad, w.grad)  # from values and g only
    assert close(values.grad, v.grad, rtol=1.5e-2)
    del again
    read.clear()
    triton_ops.sparse_decode(values[:4], indices[:4], W_dec)  # 24 pairs: W_dec itself
    triton_ops.sparse_decode(values.detach().float(), indices, W_dec)  # float32 codes: W_dec itself
    assert read == [torch.float32, torch.float32]


def test_weight_gradient_is_deterministic():
    """The segment-sum owns each latent row in one program: no atomics, same bits every run."""
    torch.manual_seed(2)
    values, W_dec = leaf(50, 6), leaf(30, 24)
    indices = torch.randint(0, 30, (50, 6), device=DEVICE)
    g = torch.randn(50, 24, device=DEVICE)
    first, second = (torch.autograd.grad(triton_ops.sparse_decode(values, indices, W_dec), W_dec, g)[0]
                     for _ in range(2))
    assert torch.equal(first, second)


def test_flashsae_import_does_not_import_triton():
    code = "import sys, flashsae, flashsae.kernels, flashsae.models; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sparse_decode_of_no_latents_is_zero():
    out = triton_ops.sparse_decode(torch.zeros(5, 0, device=DEVICE), torch.zeros(5, 0, dtype=torch.long, device=DEVICE),
                                   torch.randn(10, 24, device=DEVICE))
    assert out.shape == (5, 24) and not out.any()


# ---- selection --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1000, 1), (1000, 7), (640, 5), (4160, 32)])
def test_group_max_topk_returns_the_values_of_torch_topk(n, k):
    torch.manual_seed(n + k)
    scores = torch.randint(-4, 5, (11, n), device=DEVICE).float()  # many ties
    scores[0] = float("-inf")
    scores[1, : n // 2] = float("-inf")
    scores[2, -1] = 100.0  # the winner sits in the ragged last group
    values, indices = triton_ops.select_topk(scores, k, min_latents=0)
    assert triton_ops.triton.cdiv(n, triton_ops.GROUP) >= 2 * k  # the prefilter ran
    want = scores.topk(k, dim=-1).values
    assert torch.equal(values.sort(-1).values, want.sort(-1).values)
    assert bool(((indices >= 0) & (indices < n)).all())
    assert torch.equal(scores.gather(1, indices)[2:], values[2:])
    finite = indices[2:]
    assert bool((finite.sort(-1).values.diff(dim=-1) > 0).all())  # distinct latents per row


def test_group_maxima_masks_the_ragged_last_group():
    scores = torch.randn(3, 150, device=DEVICE)
    maxima = triton_ops.group_maxima(scores, 64)
    padded = torch.nn.functional.pad(scores, (0, 42), value=float("-inf"))
    assert torch.equal(maxima, padded.view(3, 3, 64).amax(-1))


# ---- topk_encode ------------------------------------------------------------------------------

def encode_loss(impl, x_c, W_enc, b_enc, k, W_dec, aux_mask=None, k_aux=0):
    """An order-invariant loss through both outputs, decoded by the reference for both impls."""
    values, idx, aux_values, aux_idx = impl.topk_encode(x_c, W_enc, b_enc, k, aux_mask=aux_mask, k_aux=k_aux)
    y = reference.sparse_decode(values, idx, W_dec)
    loss = y.pow(2).sum() + (values.pow(3)).sum()
    if k_aux:
        loss = loss + 0.5 * reference.sparse_decode(aux_values, aux_idx, W_dec).pow(2).sum()
    return loss, values, idx, aux_values, aux_idx


@pytest.mark.parametrize("n_tok,d,n,k,k_aux,n_dead", [
    (37, 24, 100, 1, 0, 0),     # k = 1, n not a multiple of the group
    (33, 65, 130, 7, 3, 40),    # AuxK through the prefilter too (17 groups >= 2 * 7)
    (21, 100, 90, 5, 12, 5),    # fewer dead latents than k_aux; AuxK falls back to torch.topk
    (18, 24, 50, 4, 4, 20),     # too few groups (7 < 2 * 4): plain torch.topk
])
def test_topk_encode_matches_reference(grouped, n_tok, d, n, k, k_aux, n_dead):
    torch.manual_seed(n + k)
    x_c, W_enc, b_enc, W_dec = leaf(n_tok, d), leaf(n, d), leaf(n), torch.randn(n, d, device=DEVICE) / d**0.5
    aux_mask = None
    if k_aux:
        aux_mask = torch.zeros(n, dtype=torch.bool, device=DEVICE)
        aux_mask[torch.randperm(n, device=DEVICE)[:n_dead]] = True
    params = [x_c, W_enc, b_enc]
    results = {}
    for impl in (reference, triton_ops):
        for p in params:
            p.grad = None
        loss, values, idx, aux_values, aux_idx = encode_loss(impl, x_c, W_enc, b_enc, k, W_dec, aux_mask, k_aux)
        loss.backward()
        results[impl] = (loss.detach(), values.detach(), idx, aux_values.detach(), aux_idx,
                         [p.grad.clone() for p in params])
    ref, tri = results[reference], results[triton_ops]
    assert close(tri[0], ref[0])
    assert torch.equal(tri[1].sort(-1).values, ref[1].sort(-1).values)
    assert torch.equal(tri[2].sort(-1).values, ref[2].sort(-1).values)  # continuous data: no ties
    assert torch.equal(tri[3].sort(-1).values, ref[3].sort(-1).values)
    assert tri[4].shape == (n_tok, k_aux if k_aux else 0)
    if k_aux:
        assert bool(aux_mask[tri[4][tri[3] > 0]].all())
    for got, want, name in zip(tri[5], ref[5], ("x_c", "W_enc", "b_enc")):
        assert close(got, want), (name, (got - want).abs().max())


def test_topk_encode_bf16_input(grouped):
    torch.manual_seed(5)
    x_c = leaf(17, 65, dtype=torch.bfloat16)
    # Distinct integer biases dominate the bf16 pre-activations (|x W^T| < 1/4 of their 1/2 ulp):
    # no ties, so both implementations pick the same latents and the gradients are comparable.
    W_enc = (torch.randn(100, 65, device=DEVICE) * 0.002).requires_grad_()
    b_enc = torch.randperm(100, device=DEVICE).float().requires_grad_()
    values, idx, _, _ = triton_ops.topk_encode(x_c, W_enc, b_enc, 4)
    ref_values, ref_idx, _, _ = reference.topk_encode(x_c, W_enc, b_enc, 4)
    assert values.dtype == torch.bfloat16
    assert torch.equal(values.sort(-1).values, ref_values.sort(-1).values)
    h = torch.randn(100, device=DEVICE)  # per-latent weights: the loss ignores the order of the k slots
    grads = torch.autograd.grad((values.float() * h[idx]).sum(), [x_c, W_enc, b_enc])
    ref_grads = torch.autograd.grad((ref_values.float() * h[ref_idx]).sum(), [x_c, W_enc, b_enc])
    assert [t.dtype for t in grads] == [torch.bfloat16, torch.float32, torch.float32]
    for got, want in zip(grads, ref_grads):
        assert close(got, want, rtol=1e-2)


# ---- dispatch and a whole training step -------------------------------------------------------

def test_forcing_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("FLASHSAE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.selection.impl(torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert kernels.selection.impl(torch.device("cpu")) == "reference"
    monkeypatch.setenv("FLASHSAE_KERNELS", "reference")
    assert kernels.selection.impl(torch.device("cuda")) == "reference"


def test_topk_training_steps_match_reference(grouped, monkeypatch):
    torch.manual_seed(0)
    model = models.build("topk", d_in=24, d_sae=128, k=4).to(DEVICE)
    x = torch.randn(40, 24, device=DEVICE)
    launches = []
    select = triton_ops.select_topk
    monkeypatch.setattr(triton_ops, "select_topk", lambda *a, **kw: launches.append(1) or select(*a, **kw))
    runs = {}
    for impl in ("reference", "triton"):
        monkeypatch.setenv("FLASHSAE_KERNELS", impl)
        m = copy.deepcopy(model)
        tr = Trainer(m, TrainConfig(lr=1e-3, dtype="float32"), total_steps=10, dead_after_rows=1)
        first = tr.step(x)
        tr.refresh_aux()  # most latents did not fire in the first batch: AuxK runs next
        assert tr.use_aux
        second = tr.step(x)
        runs[impl] = (first, second, {name: p.detach().clone() for name, p in m.named_parameters()})
    assert len(launches) == 3  # the Triton path ran: two top-k selections and one AuxK selection
    ref, tri = runs["reference"], runs["triton"]
    for got, want in zip(tri[:2], ref[:2]):
        for field in ("loss", "mse", "l0", "aux"):
            assert close(getattr(got, field), getattr(want, field)), field
    assert float(tri[1].aux) > 0
    for name, p in ref[2].items():
        assert close(tri[2][name], p, rtol=1e-4), name  # after two Adam steps


# ---- AuxK, zero-value slots, shared sorts, b_dec, device ---------------------------------------

@pytest.mark.parametrize("rows", [None, 11])  # AuxK on every row; on the first 11 (DeadLatents.rows)
def test_topk_encode_with_few_dead_candidates_matches_reference(grouped, rows):
    """DeadLatents: the selection runs among the gathered candidate columns, k_aux capped at their count."""
    torch.manual_seed(7)
    n = 120
    x_c, W_enc, b_enc, W_dec = leaf(29, 24), leaf(n, 24), leaf(n), torch.randn(n, 24, device=DEVICE) / 5
    mask = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    candidates = torch.randperm(n, device=DEVICE)[:3]
    mask[candidates] = True
    dead = kernels.DeadLatents(mask, candidates, rows)
    results = {}
    for impl in (reference, triton_ops):
        for p in (x_c, W_enc, b_enc):
            p.grad = None
        loss, values, idx, aux_values, aux_idx = encode_loss(impl, x_c, W_enc, b_enc, 4, W_dec, dead, 10)
        loss.backward()
        results[impl] = (loss.detach(), aux_values.detach(), aux_idx, [p.grad.clone() for p in (x_c, W_enc, b_enc)])
    ref, tri = results[reference], results[triton_ops]
    assert tri[2].shape == (rows or 29, 3)
    assert close(tri[0], ref[0])
    assert torch.equal(tri[1].sort(-1).values, ref[1].sort(-1).values)
    for got, want in zip(tri[3], ref[3]):
        assert close(got, want)


def test_zero_value_slots_are_never_read_by_the_kernels():
    """Rows reached only through slots of value 0 hold NaN: a load of them would poison the result."""
    torch.manual_seed(8)
    values = torch.rand(21, 4, device=DEVICE)
    values[:, 3] = 0  # AuxK slots left without a dead latent: all ties on latent 30
    values[5, 0] = 0
    idx = torch.stack([torch.randperm(30, device=DEVICE)[:4] for _ in range(21)])
    idx[:, 3] = 30
    W = torch.randn(31, 40, device=DEVICE)
    W[30] = float("nan")
    W.requires_grad_()
    v = values.clone().requires_grad_()
    out = triton_ops.sparse_decode(v, idx, W)
    assert bool(torch.isfinite(out).all())
    assert close(out, reference.sparse_decode(values, idx, W.detach().nan_to_num()))
    out.backward(torch.randn_like(out))
    assert bool(torch.isfinite(v.grad).all()) and bool((v.grad[values == 0] == 0).all())
    assert bool(torch.isfinite(W.grad).all()) and bool((W.grad[30] == 0).all())
    pairs, offsets = triton_ops._pairs_by_latent(idx, values, 31)
    assert int(offsets[31] - offsets[30]) == 0 and int(offsets[-1]) == int((values != 0).sum())


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def model_step_grads(model, x, dead):
    for p in model.parameters():
        p.grad = None
    out = model(x, aux_mask=dead)
    ((out.x_hat - x).pow(2).sum() + (out.aux + x).pow(2).sum()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("few", [False, True])  # whole rows masked; 3 gathered candidates, all taken
def test_one_sort_per_code_set_and_b_dec_from_one_product(monkeypatch, few):
    """The encoder's backward reuses the decoders' latent sorts, and needs no gather-sum for b_dec."""
    torch.manual_seed(9)
    model = models.build("topk", d_in=24, d_sae=96, k=3, k_aux=5).to(DEVICE)
    x = torch.randn(17, 24, device=DEVICE)
    dead = torch.zeros(96, dtype=torch.bool, device=DEVICE)
    dead[::4] = True
    if few:
        dead = kernels.DeadLatents(dead, torch.tensor([4, 40, 92], device=DEVICE))
    monkeypatch.setenv("FLASHSAE_KERNELS", "reference")
    want = model_step_grads(model, x, dead)
    monkeypatch.setenv("FLASHSAE_KERNELS", "triton")
    sorts = count_calls(monkeypatch, triton_ops, "_pairs_by_latent")
    gathers = count_calls(monkeypatch, triton_ops, "_gather_sum")
    got = model_step_grads(model, x, dead)
    # the top-k codes and the AuxK codes, each sorted once; AuxK codes taking all 3 candidates are a
    # dense block (matrix products: no sort, no gather)
    assert len(sorts) == (1 if few else 2)
    assert len(gathers) == (1 if few else 2)  # the decoder forwards; no (batch, d_in) input gradient for b_dec
    for name, g in want.items():
        assert close(got[name], g, rtol=1e-4), name


def test_kernels_launch_under_their_tensors_device(monkeypatch):
    """Every launch happens inside the device context of the tensors (torch.cuda.device off the CPU)."""
    depth, seen, launches = [0], [], []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            depth[0] += 1
            seen.append(self.device)

        def __exit__(self, *exc):
            depth[0] -= 1

    monkeypatch.setattr(triton_ops, "_launch_device", lambda t: Recorder(t.device))

    class Launcher:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append((self.name, depth[0]))
            return self.kernel[grid]

    for name in ("_gather_sum_kernel", "_gather_dot_kernel", "_segment_sum_kernel", "_group_max_kernel"):
        monkeypatch.setattr(triton_ops, name, Launcher(name, getattr(triton_ops, name)))
    monkeypatch.setattr(triton_ops, "MIN_GROUPED_LATENTS", 0)
    monkeypatch.setattr(triton_ops, "GROUP", 8)
    x_c, W_enc, b_enc, W_dec = leaf(9, 16), leaf(160, 16), leaf(160), leaf(160, 16)
    values, idx, _, _ = triton_ops.topk_encode(x_c, W_enc, b_enc, 2)
    triton_ops.sparse_decode(values, idx, W_dec).sum().backward()
    assert {name for name, _ in launches} == {"_gather_sum_kernel", "_gather_dot_kernel", "_segment_sum_kernel",
                                              "_group_max_kernel"}
    assert all(d > 0 for _, d in launches), launches
    assert set(seen) == {x_c.device}


def test_launch_device_is_the_tensors_cuda_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())

    class FakeCuda:
        device = torch.device("cuda", 1)

    with triton_ops._launch_device(FakeCuda()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with triton_ops._launch_device(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]  # nothing to enter for a CPU tensor
