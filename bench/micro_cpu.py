"""CPU micro-measurements quoted in flashsae's code comments, reproducible.

    python -m bench.micro_cpu

1. The encoder product (4096 x 256) @ (256 x 4096) in bf16 into a fresh result tensor against a
   reused one (`kernels.reference` keeps a per-thread buffer): the difference is the page faults
   of a fresh 32 MiB result.
2. The squared error forward and backward, `((x_hat - x) ** 2).sum(-1).mean()` through autograd
   against flashsae's one-pass `_SumOfSquares` (train/trainer.py), on 4096 x 256.
3. The weight-gradient segment sum over (row, slot) pairs sorted by latent (4096 rows, d=256, 4096
   latents, k=16 and k=128 as AuxK uses at half the latents dead): MKL's CSR-by-dense product
   against `embedding_bag` with the segments as bags (`kernels.reference.LatentSegments`).
4. Pushing the live latents of a 4096 x 4096 bf16 pre-activation matrix to -inf for the AuxK
   selection: `masked_fill_` against adding a (4096,) row of 0 / -inf, and a gather of 128 columns.
5. The stable sort of the (row, slot) pairs' latent ids (int32 keys in [0, 4096]) at 8,192 to
   262,144 keys: `torch.sort(stable=True)` against the sort `LatentSegments` uses (NumPy's int16
   radix sort below 65,536 keys).
Median of --repeat timed calls after one warm-up, on --threads threads; the two sides of a
comparison alternate call by call.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F


def _time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _time_pair(a, b, repeat: int) -> tuple[float, float]:
    """Median ms of a and of b, called alternately (a, b, a, b, ...) after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def _segment_sums(g: torch.Generator, k: int, repeat: int) -> tuple[float, float]:
    from flashsae.kernels.reference import LatentSegments

    n_rows, d, n = 4096, 256, 4096
    idx = torch.rand(n_rows, n, generator=g).topk(k, dim=1).indices
    weights = torch.rand(n_rows, k, generator=g)
    dense = torch.randn(n_rows, d, generator=g)
    seg = LatentSegments(idx, n)
    w_sorted = weights.reshape(-1)[seg.order]

    def csr():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            G = torch.sparse_csr_tensor(seg.crow, seg.rows, w_sorted, size=(n, n_rows), check_invariants=False)
        return G @ dense

    def bags():
        return F.embedding_bag(seg.rows, dense, seg.crow, per_sample_weights=w_sorted, mode="sum",
                               include_last_offset=True)

    torch.testing.assert_close(csr(), bags(), rtol=1e-4, atol=1e-4)
    return _time_pair(csr, bags, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    # The measurement is of this private function itself, so the bench imports it.
    from flashsae.train.trainer import _SumOfSquares  # noqa: PLC2701

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, 256, generator=g).bfloat16()
    w = torch.randn(4096, 256, generator=g).bfloat16()
    out = torch.empty(4096, 4096, dtype=torch.bfloat16)
    fresh = _time(lambda: torch.mm(a, w.t()), args.repeat)
    reused = _time(lambda: torch.mm(a, w.t(), out=out), args.repeat)

    x = torch.randn(4096, 256, generator=g)
    x_hat = torch.randn(4096, 256, generator=g, requires_grad=True)

    def autograd_mse():
        ((x_hat - x) ** 2).sum(-1).mean().backward()

    def one_pass_mse():
        (_SumOfSquares.apply(x_hat - x) / x.shape[0]).backward()

    old, new = _time(autograd_mse, args.repeat), _time(one_pass_mse, args.repeat)
    seg16 = _segment_sums(g, 16, args.repeat)
    seg128 = _segment_sums(g, 128, args.repeat)
    pre = torch.randn(4096, 4096, generator=g).bfloat16()
    dead = torch.rand(4096, generator=g) < 0.5
    penalty = torch.zeros(4096, dtype=torch.bfloat16).masked_fill_(~dead, float("-inf"))
    masked, added = _time_pair(lambda: pre.masked_fill_(~dead, float("-inf")), lambda: pre.add_(penalty), args.repeat)
    cols = torch.randperm(4096, generator=g)[:128]
    gathered = _time(lambda: pre.gather(1, cols.expand(4096, -1)), args.repeat)
    print(f"threads={args.threads}, median of {args.repeat}")
    print("| measurement | before | flashsae | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| bf16 4096x256 @ 256x4096: fresh result / reused buffer | {fresh:.1f} ms | {reused:.1f} ms | "
          f"{fresh / reused:.2f}x |")
    print(f"| squared error fwd+bwd, 4096x256: autograd / one pass | {old:.2f} ms | {new:.2f} ms | {old / new:.2f}x |")
    for k, (csr, bags) in ((16, seg16), (128, seg128)):
        print(f"| segment sum, 4096 rows x k={k}, d=256: CSR product / embedding_bag | {csr:.1f} ms | {bags:.1f} ms | "
              f"{csr / bags:.2f}x |")
    print(f"| AuxK mask, 4096x4096 bf16: masked_fill_ / add a 0/-inf row | {masked:.1f} ms | {added:.1f} ms | "
          f"{masked / added:.2f}x |")
    print(f"| (gather of 128 of the 4096 columns: {gathered:.1f} ms) | | | |")
    from flashsae.kernels.reference import _stable_sort  # noqa: PLC2701

    for n in (8192, 16384, 32768, 65536, 262144):
        keys = torch.randint(0, 4097, (n,), generator=g, dtype=torch.int32)
        plain, ours = _time_pair(lambda: torch.sort(keys, stable=True), lambda: _stable_sort(keys, 4096), args.repeat)
        print(f"| stable sort of {n:,} latent ids: torch.sort / LatentSegments | {plain:.3f} ms | {ours:.3f} ms | "
              f"{plain / ours:.2f}x |")


if __name__ == "__main__":
    main()
