"""Micro-benchmark of the sparse kernels: the PyTorch reference against the Triton fast path.

    python -m bench.kernels --device cuda                        # shapes A and B, bf16
    python -m bench.kernels --device cuda --shapes A --dtype float32
    TRITON_INTERPRET=1 python -m bench.kernels --device cpu --small   # smoke test, ~1 min

Rows: decoder forward (gather-sum), decoder forward + backward (+ gather-dot, segment-sum),
encoder backward (segment-sum, gather-sum), each against `flashsae.kernels.reference` (PyTorch's
sparse ops), and the top-k selection (group-max prefilter against `torch.topk`) plus its
group-max pass alone. On CUDA each op is timed
with `triton.testing.do_bench` (median ms, L2 flushed between repeats). Every row also checks
the result: the kernels against a dense fp32 computation from the same selection (largest
error relative to the largest entry), the top-k against `torch.topk`'s sorted values.

The GPU figures are still to be measured: so far this script has only run as the CPU smoke test
under Triton's interpreter, where the times printed mean nothing (they time the interpreter).
Shapes: A = GPT-2 small residual at 32x (d_in 768, 32 768 latents, k 32, 16 384 rows), B =
Llama-3-8B residual at 32x (d_in 4 096, 131 072 latents, k 64, 8 192 rows).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

SHAPES = {  # name: (rows N, d_in, d_sae n, k)
    "A": (16_384, 768, 32_768, 32),
    "B": (8_192, 4_096, 131_072, 64),
}
SMALL = (64, 65, 1_024, 8)  # 16 groups of 64 >= 2k: the prefilter runs


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def once(fn):  # the interpreter: one run, for the smoke test only
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return once


def _rel_err(got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _dense_codes(values, idx, n):
    return torch.zeros(values.shape[0], n, device=values.device).scatter_add_(1, idx, values.float())


def bench_shape(name, N, d, n, k, *, device, dtype, time_ms, min_latents):
    from flashsae.kernels import reference, triton_ops

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    rows = []

    def row(op, ref_fn, tri_fn, errors):
        ref_ms, tri_ms = time_ms(ref_fn), time_ms(tri_fn)
        rows.append((name, op, ref_ms, tri_ms, ref_ms / tri_ms, errors))

    # ---- decoder: gather-sum forward; gather-dot + segment-sum backward
    W_dec = randn(n, d, scale=d**-0.5).requires_grad_()
    values = randn(N, k).abs().requires_grad_()
    idx = torch.stack([torch.randperm(n, generator=gen, device=device)[:k] for _ in range(min(N, 256))])
    idx = idx.repeat(-(-N // idx.shape[0]), 1)[:N]  # distinct per row, like a top-k
    g = randn(N, d)
    codes = _dense_codes(values.detach(), idx, n)
    want_y = codes @ W_dec.detach().float()
    want_dv = (g.float() @ W_dec.detach().float().t()).gather(1, idx)
    want_dW = codes.t() @ g.float()
    del codes

    def decode_check(impl):
        y = impl.sparse_decode(values, idx, W_dec)
        dv, dW = torch.autograd.grad(y, [values, W_dec], g)
        return max(_rel_err(y, want_y), _rel_err(dv, want_dv), _rel_err(dW, want_dW))

    errs = (decode_check(reference), decode_check(triton_ops))
    with torch.no_grad():
        row("decode fwd", lambda: reference.sparse_decode(values, idx, W_dec),
            lambda: triton_ops.sparse_decode(values, idx, W_dec), errs)
    row("decode fwd+bwd",
        lambda: torch.autograd.grad(reference.sparse_decode(values, idx, W_dec), [values, W_dec], g),
        lambda: torch.autograd.grad(triton_ops.sparse_decode(values, idx, W_dec), [values, W_dec], g), errs)
    W_dec = values = g = want_y = want_dv = want_dW = None  # free them (the closures above are done)

    # ---- encoder: forward once per implementation, then time its backward alone
    x_c = randn(N, d).requires_grad_()
    W_enc = randn(n, d, scale=d**-0.5).requires_grad_()
    b_enc = randn(n, scale=0.1).requires_grad_()
    outputs, errs = {}, []
    for impl in (reference, triton_ops):
        v, i, _, _ = impl.topk_encode(x_c, W_enc, b_enc, k)
        gv = torch.randn(v.shape, generator=gen, device=device).to(v.dtype)
        outputs[impl] = (v, gv)
        grads = torch.autograd.grad(v, [x_c, W_enc, b_enc], gv, retain_graph=True)
        dense = _dense_codes(torch.where(v > 0, gv, 0), i, n)  # dL/dpre, from this selection
        want = (dense @ W_enc.detach().float(), dense.t() @ x_c.detach().float(), dense.sum(0))
        errs.append(max(_rel_err(a, b) for a, b in zip(grads, want)))
        del dense, want, grads

    def enc_bwd(impl):
        v, gv = outputs[impl]
        return lambda: torch.autograd.grad(v, [x_c, W_enc, b_enc], gv, retain_graph=True)

    row("encoder bwd", enc_bwd(reference), enc_bwd(triton_ops), tuple(errs))
    outputs = None  # free the graphs

    # ---- selection on the bf16/fp32 pre-activations
    with torch.no_grad():
        pre = torch.addmm(b_enc, x_c, W_enc.t())
        want = pre.topk(k, dim=-1).values.sort(-1).values
        got, got_idx = triton_ops.select_topk(pre, k, min_latents=min_latents)
        n_bad = int((got.sort(-1).values != want).any(-1).sum()) + int((pre.gather(1, got_idx) != got).any(-1).sum())
        group = triton_ops.GROUP
        row("top-k (group-max)", lambda: pre.topk(k, dim=-1, sorted=False),
            lambda: triton_ops.select_topk(pre, k, min_latents=min_latents), (0.0, float(n_bad)))
        rows.append((name, "  group-max pass", float("nan"), time_ms(lambda: triton_ops.group_maxima(pre, group)),
                     float("nan"), (float("nan"), float("nan"))))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shapes", default="A,B", help="comma-separated shape names (A, B)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="activations and weights (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--small", action="store_true",
                   help=f"one tiny shape (N, d, n, k) = {SMALL}, group-max forced on: correctness smoke test")
    args = p.parse_args(argv)
    if args.device == "cpu" and (os.environ.get("TRITON_INTERPRET") != "1" or not args.small):
        p.error("--device cpu is only a smoke test: TRITON_INTERPRET=1 python -m bench.kernels --device cpu --small")
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown and not args.small:
        p.error(f"unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --device cpu --small with TRITON_INTERPRET=1 for a smoke test")
    import triton

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    shapes = {"small": SMALL} if args.small else {s: SHAPES[s] for s in args.shapes.split(",")}
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.machine()} CPU, Triton interpreter"
    print(f"# {device_name}, torch {torch.__version__}, triton {triton.__version__}, {dtype}")
    if args.device == "cpu":
        print("# interpreter run: times below are NOT kernel timings, only the error columns mean anything")
    print(f"{'shape':<6} {'op':<20} {'reference ms':>12} {'triton ms':>10} {'speed-up':>9} "
          f"{'err ref':>9} {'err triton':>10}")
    failed = False
    for name, (N, d, n, k) in shapes.items():
        rows = bench_shape(name, N, d, n, k, device=args.device, dtype=dtype, time_ms=_timer(args.device),
                           min_latents=0 if args.small else None)
        for shape, op, ref_ms, tri_ms, speedup, (err_ref, err_tri) in rows:
            print(f"{shape:<6} {op:<20} {ref_ms:>12.3f} {tri_ms:>10.3f} {speedup:>8.2f}x "
                  f"{err_ref:>9.1e} {err_tri:>10.1e}")
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            failed |= op.startswith("top-k") and err_tri != 0
            failed |= not op.startswith(("top-k", "  ")) and not err_tri <= tol
    print("# err: max |got - dense fp32| / max |dense|; for top-k, rows whose values differ from torch.topk")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
