"""Batched OMP against scikit-learn's, and the estimator's OMP codes against dictionary learning."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.decomposition import sparse_encode
from sklearn.linear_model import orthogonal_mp_gram

from flashsae.errors import ConfigError, DataError
from flashsae.omp import omp


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(n_rows=200, d=20, n_atoms=60, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    return rng.standard_normal((n_rows, d)).astype(dtype), D.astype(dtype)


def _dense(values, indices, n_atoms):
    out = np.zeros((values.shape[0], n_atoms))
    np.put_along_axis(out, indices.numpy(), values.numpy(), axis=1)
    return out


@pytest.mark.parametrize("n_nonzero", [1, 5, 13])
def test_matches_sklearn_sparse_encode(n_nonzero):
    X, D = _problem()
    values, indices = omp(torch.from_numpy(X), torch.from_numpy(D), n_nonzero)
    assert values.shape == indices.shape == (200, n_nonzero) and indices.dtype == torch.int64
    ours = _dense(values, indices, 60)
    ref = sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=n_nonzero)
    np.testing.assert_array_equal(ours != 0, ref != 0)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    gram = orthogonal_mp_gram(D @ D.T, D @ X.T, n_nonzero_coefs=n_nonzero).T
    np.testing.assert_allclose(ours, gram, atol=1e-4)


def test_float32_and_batching_agree():
    X, D = _problem(n_rows=101)
    ref = _dense(*omp(torch.from_numpy(X), torch.from_numpy(D), 6), 60)
    v32, i32 = omp(torch.from_numpy(X).float(), torch.from_numpy(D).float(), 6, batch=7)
    np.testing.assert_allclose(_dense(v32.double(), i32, 60), ref, atol=1e-4)


def test_indices_are_distinct_and_in_selection_order():
    X, D = _problem()
    values, indices = omp(torch.from_numpy(X), torch.from_numpy(D), 8)
    assert all(len(set(row)) == 8 for row in indices.tolist())
    # the first pick is the atom most correlated with the row
    np.testing.assert_array_equal(indices[:, 0].numpy(), np.abs(X @ D.T).argmax(1))


def test_recovers_a_planted_sparse_combination():
    rng = np.random.default_rng(1)
    _, D = _problem(n_atoms=40, d=30)
    support = np.stack([rng.choice(40, 3, replace=False) for _ in range(50)])
    coef = rng.uniform(1, 2, (50, 3))
    X = np.einsum("nk,nkd->nd", coef, D[support])
    values, indices = omp(torch.from_numpy(X), torch.from_numpy(D), 3)
    recon = np.einsum("nk,nkd->nd", values.numpy(), D[indices.numpy()])
    np.testing.assert_allclose(recon, X, atol=1e-8)
    np.testing.assert_array_equal(np.sort(indices.numpy(), 1), np.sort(support, 1))


def test_rows_stop_when_nothing_is_left_to_explain():
    X, D = _problem(d=20, n_atoms=60)
    X[0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scikit-learn warns when it stops early
        ref = sparse_encode(X, D, algorithm="omp", n_nonzero_coefs=25)
    values, indices = omp(torch.from_numpy(X), torch.from_numpy(D), 25)
    ours = _dense(values, indices, 60)
    assert not ours[0].any()
    assert ((ours != 0).sum(1) <= 20).all()  # at most d independent atoms
    np.testing.assert_allclose(ours @ D, X, atol=1e-8)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("args, error, match", [
    (dict(n_nonzero=0), ConfigError, r"n_nonzero must be in \[1, 60\]"),
    (dict(n_nonzero=61), ConfigError, r"n_nonzero must be in \[1, 60\]"),
    (dict(batch=0), ConfigError, "batch must be >= 1"),
    (dict(scale=2.0), DataError, "dictionary rows must have unit norm"),
    (dict(width=19), DataError, "must share d"),
])
def test_errors(args, error, match):
    X, D = _problem()
    D = D * args.pop("scale", 1.0)
    X = X[:, :args.pop("width", 20)]
    with pytest.raises(error, match=match):
        omp(torch.from_numpy(X), torch.from_numpy(D), **{"n_nonzero": 4, **args})


@pytest.mark.slow
def test_digits_heldout_fvu_within_10_percent_of_dictionary_learning():
    """Error-side acceptance: 8-atom OMP codes over the SAE's atoms vs scikit-learn's dictionary learning."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from threadpoolctl import threadpool_limits

    from flashsae.sklearn import SparseAutoencoder

    X = load_digits().data
    X_train, X_test = X[:1500], X[1500:]

    def fvu(x, x_hat):
        return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    # 128 atoms (not 256) keeps the dictionary learning side under 10 s on two busy cores.
    sae = SparseAutoencoder(n_components=128, epochs=50, transform_algorithm="omp", transform_n_nonzero_coefs=8,
                            random_state=0, device="cpu").fit(X_train)
    codes = sae.transform(X_test)
    assert (codes != 0).sum(1).max() == 8
    ours = fvu(X_test, sae.inverse_transform(codes))

    with warnings.catch_warnings(), threadpool_limits(1):  # one BLAS thread: no contention with others
        warnings.simplefilter("ignore")  # lasso coordinate descent convergence warnings
        mbdl = MiniBatchDictionaryLearning(n_components=128, alpha=0.75, transform_algorithm="omp",
                                           transform_n_nonzero_coefs=8, fit_algorithm="cd", batch_size=256,
                                           random_state=0).fit(X_train)
    theirs = fvu(X_test, mbdl.transform(X_test) @ mbdl.components_)
    assert ours <= 1.10 * theirs, f"held-out FVU {ours:.4f} vs MiniBatchDictionaryLearning {theirs:.4f}"
