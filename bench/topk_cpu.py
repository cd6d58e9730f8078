"""torch.topk against flashsae's compiled CPU top-k (`flashsae.kernels.cpu_topk`), same inputs.

    python -m bench.topk_cpu
    python -m bench.topk_cpu --rows 4096 --shapes 4096:16 512:16 4096:128 512:32 --threads 2

Each shape is n:k (latents, kept per row) on standard normal rows; both dtypes. Prints the median
of --repeat timed calls after one warm-up, and checks that both return the same values.
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
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--shapes", nargs="+", default=["4096:16", "512:16", "4096:128", "512:32", "256:32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    from flashsae.kernels import cpu_topk

    torch.set_num_threads(args.threads)
    print(f"compiled kernel available: {cpu_topk.available()}; rows={args.rows}, threads={args.threads}, "
          f"median of {args.repeat}")
    print("| latents, k | dtype | torch.topk ms | flashsae ms | speed-up | same values |")
    print("|---|---|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        n, k = map(int, shape.split(":"))
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(args.rows, n, generator=g).to(dtype)
            ref = _time(lambda: x.topk(k, dim=-1, sorted=False), args.repeat)
            ours = _time(lambda: cpu_topk.topk(x, k), args.repeat)
            same = torch.equal(cpu_topk.topk(x, k)[0].float().sort(-1).values,
                               x.topk(k, dim=-1, sorted=False).values.float().sort(-1).values)
            print(f"| {n}, {k} | {str(dtype).removeprefix('torch.')} | {ref:.2f} | {ours:.2f} | {ref / ours:.2f}x | "
                  f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
