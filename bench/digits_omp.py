"""flashsae's scikit-learn estimator with OMP codes vs MiniBatchDictionaryLearning on digits.

    python -m bench.digits_omp
    python -m bench.digits_omp --threads 1 --n-components 256 --epochs 50 200

Both learn a dictionary on the first 1500 rows of scikit-learn's digits and encode the 297
held-out rows with orthogonal matching pursuit at exactly 8 atoms per row (matched L0 = 8);
FVU is measured in pixel units on the held-out rows. MiniBatchDictionaryLearning runs with
alpha=0.75, fit_algorithm="cd", batch_size=256, random_state=0, on raw rows (as given) and on
rows centred with the training mean (a stronger baseline: flashsae has a decoder bias). Speed is
training rows processed (repeats over epochs included) per second of `fit` wall time, both
libraries on the same number of CPU threads, after one small warm-up fit of flashsae. Prints a
markdown table; writes nothing.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings

import numpy as np
import torch
from threadpoolctl import threadpool_limits

N_TRAIN = 1500
L0 = 8


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def run_flashsae(X_train, X_test, n_components: int, epochs: float, device: str) -> dict:
    from flashsae import SparseAutoencoder

    sae = SparseAutoencoder(n_components=n_components, epochs=epochs, transform_algorithm="omp",
                            transform_n_nonzero_coefs=L0, random_state=0, device=device)
    t0 = time.perf_counter()
    sae.fit(X_train)
    seconds = time.perf_counter() - t0
    codes = sae.transform(X_test)
    return {"method": f"flashsae topk (trained k={sae.model_.cfg.k}), OMP encode, {epochs:g} epochs",
            "seconds": seconds, "rows": sae.result_.rows_seen, "fvu": fvu(X_test, sae.inverse_transform(codes)),
            "l0": float((codes != 0).sum(1).mean())}


def run_mbdl(X_train, X_test, n_components: int, center: bool) -> dict:
    from sklearn.decomposition import MiniBatchDictionaryLearning

    mean = X_train.mean(0) if center else np.zeros(X_train.shape[1])
    est = MiniBatchDictionaryLearning(n_components=n_components, alpha=0.75, transform_algorithm="omp",
                                      transform_n_nonzero_coefs=L0, fit_algorithm="cd", batch_size=256,
                                      random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lasso coordinate descent convergence warnings
        t0 = time.perf_counter()
        est.fit(X_train - mean)
        seconds = time.perf_counter() - t0
    codes = est.transform(X_test - mean)
    return {"method": f"MiniBatchDictionaryLearning, cd, {'centred' if center else 'raw'} rows",
            "seconds": seconds, "rows": est.n_steps_ * est.batch_size,
            "fvu": fvu(X_test, codes @ est.components_ + mean), "l0": float((codes != 0).sum(1).mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-components", type=int, default=256)
    parser.add_argument("--epochs", type=float, nargs="+", default=[50.0],
                        help="flashsae epochs; one table row each")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both libraries")
    parser.add_argument("--device", default="cpu", help="flashsae device (scikit-learn always runs on the CPU)")
    args = parser.parse_args(argv)

    from sklearn.datasets import load_digits

    X = load_digits().data
    X_train, X_test = X[:N_TRAIN], X[N_TRAIN:]
    torch.set_num_threads(args.threads)
    rows = []
    with threadpool_limits(args.threads):
        # Warm-up: the first fit in a process pays one-time imports (torch's compiler stack behind
        # the fused Adam step), a start-up cost rather than a training speed.
        run_flashsae(X_train[:64], X_test[:8], 16, 1, args.device)
        for epochs in args.epochs:
            rows.append(run_flashsae(X_train, X_test, args.n_components, epochs, args.device))
        for center in (False, True):
            rows.append(run_mbdl(X_train, X_test, args.n_components, center))

    base = rows[len(args.epochs)]  # MiniBatchDictionaryLearning on raw rows, as configured in its docs
    print(f"digits: {N_TRAIN} train / {len(X_test)} held-out rows, {args.n_components} atoms, L0 = {L0}, "
          f"{args.threads} CPU thread(s), flashsae on {args.device}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print("| method | fit s | rows processed | rows/s | rows/s vs MBDL raw | held-out FVU | FVU vs MBDL raw | L0 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = r["rows"] / r["seconds"]
        print(f"| {r['method']} | {r['seconds']:.2f} | {r['rows']:,} | {speed:,.0f} | "
              f"{speed / (base['rows'] / base['seconds']):.2f}x | {r['fvu']:.4f} | {r['fvu'] / base['fvu']:.3f} | "
              f"{r['l0']:.1f} |")
    print(f"\ncommand: python -m bench.digits_omp {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip())


if __name__ == "__main__":
    main()
