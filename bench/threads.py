"""Threads on a busy machine: OpenMP's wait policy and the thread count, side by side.

Each configuration trains in its own process (the wait policy is read when torch loads OpenMP),
with `--busy N` processes spinning on the CPU beside it to stand for other work on the machine.
Prints rows/s per (policy, threads) and each one's ratio to one thread with the default policy.

    python -m bench.threads                 # the shape that collapsed: 4.5k x 384, 1024 latents
    python -m bench.threads --busy 0        # a quiet machine
    python -m bench.threads --d 256 --latents 4096 --rows 9000 --batch 4096 --k 16
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

CHILD = """
import json, sys, time
import numpy as np
import flashsae
a = json.loads(sys.argv[1])
x = np.random.default_rng(0).normal(size=(a["rows"], a["d"])).astype(np.float32)
_, r = flashsae.train(x, latents=a["latents"], k=a["k"], batch_size=a["batch"], epochs=a["epochs"], quiet=True,
                      threads=a["threads"], seed=0, eval_every=0, device="cpu")
print(json.dumps({"rows_per_s": r.rows_per_s}))
"""


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def run(policy: str, threads: int, args) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    spec = json.dumps({"rows": args.rows, "d": args.d, "latents": args.latents, "k": args.k, "batch": args.batch,
                       "epochs": args.epochs, "threads": threads})
    out = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the training process failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])["rows_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4500)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--busy", type=int, default=1, help="processes spinning beside the training (default 1)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    # "" is OpenMP's own default (libgomp ignores an empty value; flashsae sets PASSIVE only when
    # the variable is absent).
    configs = [("", 1), ("", 2), ("PASSIVE", 1), ("PASSIVE", 2)]
    spinners = [mp.Process(target=_spin, args=(time.time() + 3600,), daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    try:
        results: dict = {c: [] for c in configs}
        for _ in range(args.repeats):
            for policy, threads in configs:  # interleaved, so drift hits every configuration alike
                results[(policy, threads)].append(run(policy, threads, args))
    finally:
        for s in spinners:
            s.terminate()
    base = max(results[("", 1)])
    print(f"busy processes: {args.busy}; rows {args.rows} x d {args.d}, {args.latents} latents, k {args.k}, "
          f"batch {args.batch}; best of {args.repeats}")
    for (policy, threads), values in results.items():
        best = max(values)
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"  OMP_WAIT_POLICY={policy or '(default)':<9} threads {threads}: {best:>9,.0f} rows/s  "
              f"({best / base:.2f}x; runs {runs})")


if __name__ == "__main__":
    main()
