"""flashsae's scikit-learn estimator with OMP codes vs MiniBatchDictionaryLearning on digits.

    python -m bench.digits_omp                           # default budgets, 3 alternated repeats
    python -m bench.digits_omp --threads 1 --repeat 5 --cold
    python -m bench.digits_omp --epochs 50 200           # also fixed flashsae budgets

Both learn a dictionary of 256 atoms on the first 1500 rows of scikit-learn's digits and encode
the 297 held-out rows with orthogonal matching pursuit at exactly 8 atoms per row (matched
L0 = 8); FVU is measured in pixel units on the held-out rows. flashsae runs as a user writes it,
`SparseAutoencoder(n_components=256, transform_algorithm="omp", transform_n_nonzero_coefs=8)`
(plus random_state=0), with its default budget, and with `--epochs` budgets if given.
MiniBatchDictionaryLearning runs with alpha=0.75, fit_algorithm="cd", batch_size=256,
random_state=0, on raw rows (as given) and on rows centred with the training mean (a stronger and
faster baseline: flashsae has a decoder bias).

Timing: the wall time of `fit`, both libraries on the same number of CPU threads, in one process
after one small warm-up fit of each (first-use imports are a start-up cost, not training speed;
`--cold` also times a first fit in a fresh process for both). The fits are alternated
(flashsae, MBDL raw, MBDL centred, flashsae, ...) `--repeat` times, so that load on a shared
machine falls on every method alike; the table gives the median and the range, and the ratios
are of medians. Prints a markdown table; writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

N_TRAIN = 1500
L0 = 8


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    X = load_digits().data
    return X[:N_TRAIN], X[N_TRAIN:]


def run_flashsae(X_train, X_test, n_components: int, epochs: float | None, device: str) -> dict:
    from flashsae import SparseAutoencoder

    sae = SparseAutoencoder(n_components=n_components, epochs=epochs, transform_algorithm="omp",
                            transform_n_nonzero_coefs=L0, random_state=0, device=device)
    t0 = time.perf_counter()
    sae.fit(X_train)
    seconds = time.perf_counter() - t0
    codes = sae.transform(X_test)
    budget = "default budget" if epochs is None else f"{epochs:g} epochs"
    return {"method": f"flashsae, {budget} ({sae.result_.steps} steps of {sae.result_.rows_seen // sae.result_.steps} "
                      f"rows, trained k={sae.model_.cfg.k}), OMP encode",
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


def cold_fit(which: str, args) -> float:
    """Seconds of the first fit in a fresh process; the imports before the fit are not counted."""
    call = f"cold_child({which!r}, {args.n_components}, {args.threads}, {args.device!r})"
    proc = subprocess.run([sys.executable, "-c", f"from bench.digits_omp import cold_child; {call}"],
                          capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(proc.stdout.strip().splitlines()[-1])


def cold_child(which: str, n_components: int, threads: int, device: str) -> None:
    import sklearn.decomposition  # noqa: F401
    import torch

    import flashsae.sklearn  # noqa: F401

    torch.set_num_threads(threads)
    X_train, X_test = digits()
    with threadpool_limits(threads):
        r = (run_flashsae(X_train, X_test, n_components, None, device) if which == "flashsae"
             else run_mbdl(X_train, X_test, n_components, which == "centred"))
    print(r["seconds"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-components", type=int, default=256)
    parser.add_argument("--epochs", type=float, nargs="*", default=[],
                        help="flashsae budgets in epochs besides the default one; one table row each")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both libraries")
    parser.add_argument("--device", default="cpu", help="flashsae device (scikit-learn always runs on the CPU)")
    parser.add_argument("--repeat", type=int, default=3, help="alternated fits of every method (median reported)")
    parser.add_argument("--cold", action="store_true", help="also time a first fit in a fresh process for each side")
    args = parser.parse_args(argv)

    import torch

    X_train, X_test = digits()
    torch.set_num_threads(args.threads)
    methods = [("flashsae", None)] + [("flashsae", e) for e in args.epochs] + [("mbdl", False), ("mbdl", True)]
    runs: dict[int, list[dict]] = {i: [] for i in range(len(methods))}
    with threadpool_limits(args.threads):
        # Warm-up: the first fit in a process pays one-time imports (torch._dynamo, loaded by
        # torch.optim's first optimizer; scikit-learn's lasso), a start-up cost, not training speed.
        run_flashsae(X_train[:64], X_test[:8], 16, 1, args.device)
        run_mbdl(X_train[:300], X_test[:8], 16, False)
        for _ in range(args.repeat):
            for i, (lib, arg) in enumerate(methods):
                runs[i].append(run_flashsae(X_train, X_test, args.n_components, arg, args.device) if lib == "flashsae"
                               else run_mbdl(X_train, X_test, args.n_components, arg))
    rows = []
    for i in runs:
        times = [r["seconds"] for r in runs[i]]
        rows.append({**runs[i][0], "seconds": statistics.median(times), "min": min(times), "max": max(times)})
    raw, centred = rows[-2], rows[-1]
    print(f"digits: {N_TRAIN} train / {len(X_test)} held-out rows, {args.n_components} atoms, L0 = {L0}, "
          f"{args.threads} CPU thread(s), flashsae on {args.device}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, load average before "
          f"{os.getloadavg()[0]:.1f}; fit s = median of {args.repeat} alternated fits (range)\n")
    print("| method | fit s | fit time: MBDL raw / this | MBDL centred / this | rows processed | held-out FVU | "
          "FVU / MBDL raw | FVU / MBDL centred | L0 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.3f} ({r['min']:.3f}-{r['max']:.3f}) | "
              f"{raw['seconds'] / r['seconds']:.1f}x | {centred['seconds'] / r['seconds']:.1f}x | {r['rows']:,} | "
              f"{r['fvu']:.4f} | {r['fvu'] / raw['fvu']:.3f} | {r['fvu'] / centred['fvu']:.3f} | {r['l0']:.1f} |")
    if args.cold:
        cold = {name: cold_fit(name, args) for name in ("flashsae", "raw", "centred")}
        print(f"\nfirst fit in a fresh process: flashsae default {cold['flashsae']:.2f} s, "
              f"MBDL raw {cold['raw']:.2f} s, "
              f"centred {cold['centred']:.2f} s (MBDL raw / flashsae {cold['raw'] / cold['flashsae']:.1f}x, "
              f"centred / flashsae {cold['centred'] / cold['flashsae']:.1f}x)")
    print(f"\ncommand: python -m bench.digits_omp {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(json.dumps({"flashsae_default_s": rows[0]["seconds"], "mbdl_raw_s": raw["seconds"],
                      "mbdl_centred_s": centred["seconds"], "fvu": [r["fvu"] for r in rows]}))


if __name__ == "__main__":
    main()
