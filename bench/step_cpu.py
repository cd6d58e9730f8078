"""Time flashsae's training step alone (no data loading) at a given shape, fp32 vs bf16, on the CPU.

    python -m bench.step_cpu --d 256 --latents 4096 --k 16 --batch 4096 --steps 10
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from flashsae import models
    from flashsae.config import TrainConfig
    from flashsae.train.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.d)
    opts = {"k": args.k} if args.arch in ("topk", "batchtopk") else {}
    for dtype in args.dtypes.split(","):
        torch.manual_seed(0)
        m = models.build(args.arch, d_in=args.d, d_sae=args.latents, **opts)
        tr = Trainer(m, TrainConfig(dtype=dtype), total_steps=10**6, dead_after_rows=10**12)
        for _ in range(2):
            tr.step(x)
        t = time.perf_counter()
        for _ in range(args.steps):
            tr.step(x)
        dt = (time.perf_counter() - t) / args.steps
        print(f"{args.arch} d={args.d} n={args.latents} k={args.k} batch={args.batch} {dtype}: "
              f"{dt * 1e3:.1f} ms/step, {args.batch / dt:,.0f} rows/s, threads={torch.get_num_threads()}")
        if args.profile:
            with torch.profiler.profile() as p:
                for _ in range(3):
                    tr.step(x)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
