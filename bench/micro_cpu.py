"""Two CPU micro-measurements quoted in flashsae's code comments, reproducible.

    python -m bench.micro_cpu

1. The encoder product (4096 x 256) @ (256 x 4096) in bf16 into a fresh result tensor against a
   reused one (`kernels.reference` keeps a per-thread buffer): the difference is the page faults
   of a fresh 32 MiB result.
2. The squared error forward and backward, `((x_hat - x) ** 2).sum(-1).mean()` through autograd
   against flashsae's one-pass `_SumOfSquares` (train/trainer.py), on 4096 x 256.
Median of --repeat timed calls after one warm-up, on --threads threads.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


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
    print(f"threads={args.threads}, median of {args.repeat}")
    print("| measurement | before | flashsae | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| bf16 4096x256 @ 256x4096: fresh result / reused buffer | {fresh:.1f} ms | {reused:.1f} ms | "
          f"{fresh / reused:.2f}x |")
    print(f"| squared error fwd+bwd, 4096x256: autograd / one pass | {old:.2f} ms | {new:.2f} ms | {old / new:.2f}x |")


if __name__ == "__main__":
    main()
