"""scikit-learn MiniBatchDictionaryLearning: classic online dictionary learning, not an SAE.

It learns with lasso codes (coordinate descent) via partial_fit on our batches and encodes with
OMP at exactly k nonzeros, so L0 is matched to the SAEs' k by construction. It is slow at
thousands of atoms, so it gets its own row budget (options["sklearn_max_rows"]) and may be
scored on a held-out prefix (options["sklearn_eval_rows"]). It always runs on the CPU.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from bench.anchors import common
from bench.anchors.common import BenchResult, BenchSpec

NAME = "sklearn"
DIST = "scikit-learn"
# Beyond this many atoms the library defaults (LARS, SVD init padded with zero atoms) did not
# finish a single 4096-row partial_fit in 10 minutes on 2 cores.
DEFAULTS_MAX_ATOMS = 1024


def available() -> bool:
    try:
        from sklearn.decomposition import MiniBatchDictionaryLearning  # noqa: F401
    except Exception:
        return False
    return True


def _data_init(X: np.ndarray, n_atoms: int, seed: int) -> np.ndarray:
    """First n_atoms rows, unit-normed; random gaussian atoms if the data has fewer rows."""
    D = X[:n_atoms].astype(np.float32, copy=True)
    if D.shape[0] < n_atoms:
        rng = np.random.default_rng(seed)
        D = np.concatenate([D, rng.standard_normal((n_atoms - D.shape[0], X.shape[1]), dtype=np.float32)])
    D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-12)
    return D


def _estimator(spec: BenchSpec, n_atoms: int, batch: int, alpha: float, X: np.ndarray, recommended: bool):
    from sklearn.decomposition import MiniBatchDictionaryLearning

    if spec.arch == "topk":  # OMP at exactly k nonzeros: L0 matched to the SAEs' k
        transform = dict(transform_algorithm="omp", transform_n_nonzero_coefs=min(spec.k, n_atoms))
    else:
        transform = dict(transform_algorithm="lasso_cd", transform_alpha=alpha)
    if recommended:
        fit = dict(fit_algorithm="cd", alpha=alpha, dict_init=_data_init(X, n_atoms, spec.seed))
        label = f"recommended (fp32, cd, alpha={alpha:g}, data init, {transform['transform_algorithm']} encode)"
    else:
        fit = {}
        label = f"defaults (lars, SVD init, alpha=1, {transform['transform_algorithm']} encode)"
    est = MiniBatchDictionaryLearning(
        n_components=n_atoms, batch_size=batch, n_jobs=os.cpu_count(), random_state=spec.seed, **fit, **transform
    )
    return est, label


def run(spec: BenchSpec, X_train: torch.Tensor, X_val: torch.Tensor, *, settings: str = "recommended") -> BenchResult:
    recommended = settings == "recommended"
    if not recommended and spec.d_sae > DEFAULTS_MAX_ATOMS:
        return BenchResult.failed(
            NAME, "defaults (lars, SVD init)", f"skipped: defaults are impractical at {spec.d_sae} atoms"
        )
    common.set_threads()
    alpha = float(spec.options.get("sklearn_alpha", 1.0))
    max_rows = int(spec.options.get("sklearn_max_rows", spec.n_train_rows))
    n_batches = max(1, min(spec.n_train_rows, max_rows) // spec.batch_size)
    X = X_train.detach().cpu().float().numpy()
    # Toy fit outside the meter (lazy imports, joblib/BLAS pools). No full-size warm-up: a
    # throwaway partial_fit would cost as much as a real one, and numpy has nothing to compile.
    toy, _ = _estimator(spec, max(2 * spec.k, 32), 256, alpha, X, recommended)
    toy.partial_fit(X[:256]).transform(X[:16])
    del toy
    est, label = _estimator(spec, spec.d_sae, spec.batch_size, alpha, X, recommended)
    batches = common.batch_iter(torch.from_numpy(X), spec.batch_size, seed=spec.seed, n_batches=n_batches)
    with common.MemoryMeter("cpu") as mem, common.Timer("cpu") as timer:
        for xb in batches:
            est.partial_fit(xb.numpy())

    eval_rows = int(spec.options.get("sklearn_eval_rows", X_val.shape[0]))
    Xv = X_val[:eval_rows].detach().cpu().float()
    D = torch.from_numpy(np.asarray(est.components_, dtype=np.float32))

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(est.transform(x.numpy()), dtype=np.float32))

    metrics = common.heldout_metrics(encode, lambda c: c @ D, Xv, device="cpu")
    return common.finish(
        NAME,
        label,
        spec,
        rows=n_batches * spec.batch_size,
        seconds=timer.seconds,
        peak_mb=mem.peak_mb,
        metrics=metrics,
        version=common.package_version(DIST),
        **({"eval_rows": int(Xv.shape[0])} if Xv.shape[0] < X_val.shape[0] else {}),
        warmup="none (first partial_fit is timed)",
        timed="partial_fit over its row budget",
        device="cpu",
    )
