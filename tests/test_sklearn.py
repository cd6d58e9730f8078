"""The scikit-learn estimator: the estimator checks, the API contract, pipelines and searches."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import flashsae
from flashsae.sklearn import SparseAutoencoder
from flashsae.train import api as run_module


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: one thread avoids thread start-up costs and contention on shared machines.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fast(**params) -> SparseAutoencoder:
    return SparseAutoencoder(**{"n_components": 32, "epochs": 5, "random_state": 0, "device": "cpu", **params})


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((24, 10))
    codes = rng.exponential(size=(300, 24)) * (rng.random((300, 24)) < 0.15)
    return codes @ atoms + 0.01 * rng.standard_normal((300, 10)) + 3.0


@parametrize_with_checks([
    SparseAutoencoder(n_components=8, epochs=2, random_state=0, device="cpu"),
    SparseAutoencoder(n_components=8, epochs=2, random_state=0, device="cpu", transform_algorithm="omp",
                      transform_n_nonzero_coefs=3, sparse_output=True),
])
def test_estimator_checks(estimator, check):
    check(estimator)


def test_public_names():
    assert flashsae.SparseAutoencoder is SparseAutoencoder
    assert flashsae.SAEModule is flashsae.models.SparseAutoencoder
    assert issubclass(flashsae.SAEModule, torch.nn.Module)


def test_import_flashsae_does_not_import_sklearn():
    code = "import sys, flashsae; assert 'sklearn' not in sys.modules and 'flashsae.sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fit_transform_inverse_match_the_model(X):
    est = _fast(k=4).fit(X)
    codes = est.transform(X)
    assert codes.shape == (300, 32) and codes.dtype == np.float64
    assert ((codes != 0).sum(1) <= 4).all()
    expected = est.model_.encode(torch.from_numpy(X).float()).numpy()
    np.testing.assert_allclose(codes, expected, rtol=1e-6)
    recon = est.inverse_transform(codes)
    np.testing.assert_allclose(recon, est.model_.reconstruct(torch.from_numpy(X).float()).numpy(), rtol=1e-5,
                               atol=1e-5)
    assert est.score(X) == pytest.approx(-np.mean((X - recon) ** 2), rel=1e-6)
    assert est.score(X) > -0.5 * X.var()  # it learned something
    assert est.components_.shape == (32, 10) and est.n_components_ == 32 and est.n_features_in_ == 10
    assert est.transform(X.astype(np.float32)).dtype == np.float32


def test_sparse_output_is_csr_with_the_same_codes(X):
    est = _fast(k=4).fit(X)
    dense = est.transform(X)
    codes = est.set_params(sparse_output=True).transform(X)
    assert sp.issparse(codes) and codes.format == "csr"
    np.testing.assert_array_equal(codes.toarray(), dense)
    np.testing.assert_allclose(est.inverse_transform(codes), est.inverse_transform(dense))


def test_omp_codes_reconstruct_over_the_decoder_atoms(X):
    est = _fast(k=4, transform_algorithm="omp", transform_n_nonzero_coefs=6).fit(X)
    codes = est.transform(X)
    assert ((codes != 0).sum(1) <= 6).all() and (codes != 0).sum(1).mean() > 5
    m = est.model_
    x_hat_std = torch.from_numpy(codes).float() @ m.W_dec.detach() + m.b_dec.detach()
    np.testing.assert_allclose(est.inverse_transform(codes), m.standardizer.inverse(x_hat_std).numpy(), rtol=1e-5,
                               atol=1e-5)
    # components_ are the atoms in data units: x_hat = codes @ components_ + offset
    offset = est.inverse_transform(np.zeros((1, 32)))
    np.testing.assert_allclose(est.inverse_transform(codes), codes @ est.components_ + offset, rtol=1e-4,
                               atol=1e-4)
    # Pursuit refits the coefficients: at least as good as the encoder with as many nonzeros.
    assert est.score(X) >= est.set_params(transform_algorithm="encoder").score(X) - 1e-9


def test_omp_defaults_train_with_half_the_nonzeros(X, monkeypatch):
    seen = {}
    real = run_module.train

    def spy(data, **options):
        seen.update(options)
        return real(data, **options)

    monkeypatch.setattr(run_module, "train", spy)
    _fast(transform_algorithm="omp", transform_n_nonzero_coefs=6).fit(X)
    assert seen["k"] == 3
    _fast(transform_algorithm="omp", k=5).fit(X)
    assert seen["k"] == 5
    _fast(n_components=4).fit(X)
    assert seen["k"] == 4  # the library's 8, capped at n_components


def test_default_budget_of_a_small_fit_is_full_batch(X, monkeypatch):
    from flashsae.sklearn import SMALL_LR, SMALL_STEPS

    est = SparseAutoencoder(n_components=32, transform_algorithm="omp", transform_n_nonzero_coefs=3, random_state=0,
                            device="cpu").fit(X)
    assert (est.result_.steps, est.result_.rows_seen) == (SMALL_STEPS["omp"], SMALL_STEPS["omp"] * 300)
    assert est.score(X) > -0.05 * X.var()  # as good as 50 epochs of the library's batches (-0.037; untrained -0.15)
    est = SparseAutoencoder(n_components=32, random_state=0, device="cpu").fit(X)
    assert (est.result_.steps, est.result_.rows_seen) == (SMALL_STEPS["encoder"], SMALL_STEPS["encoder"] * 300)
    assert est.score(X) > -0.03 * X.var()  # -0.013; untrained -1.3
    seen = {}
    monkeypatch.setattr(run_module, "train", lambda data, **options: seen.update(options) or (None, None))
    SparseAutoencoder(n_components=32).fit(X)
    assert (seen["batch_size"], seen["epochs"], seen["lr"]) == (300, SMALL_STEPS["encoder"], SMALL_LR)
    assert seen["eval_every"] == 0  # no early stopping: held-out rows are evaluated at the end only
    # a budget or a batch size given, or more rows than SMALL_ROWS: the library's batches and rate
    for params in ({"epochs": 5}, {"batch_size": 100}):
        seen.clear()
        SparseAutoencoder(n_components=32, **params).fit(X)
        assert seen["batch_size"] in (32, 100) and "lr" not in seen and "rows_on_device" not in seen
    monkeypatch.setattr("flashsae.sklearn.SMALL_ROWS", 299)
    SparseAutoencoder(n_components=32).fit(X)
    assert seen["batch_size"] == 32 and "epochs" not in seen


@pytest.mark.parametrize("architecture, given, passed", [
    ("topk", dict(k=3, l1=0.1, beta=0.2), dict(k=3)),
    ("relu-l1", dict(k=3, l1=0.1), dict(l1=0.1)),
    ("kl", dict(beta=0.2, rho=0.05, l0=0.1), dict(beta=0.2, rho=0.05)),
])
def test_only_relevant_options_reach_train(X, monkeypatch, architecture, given, passed):
    seen = {}
    monkeypatch.setattr(run_module, "train", lambda data, **options: seen.update(options) or (None, None))
    _fast(architecture=architecture, **given).fit(X)
    model_options = set(flashsae.models.options()) - {"d_sae", "encoder_hidden", "decoder_hidden"}
    assert {name: seen[name] for name in model_options if name in seen} == passed
    assert seen["d_sae"] == 32 and seen["val_fraction"] == 0.0 and seen["seed"] == 0
    assert "lr" not in seen and "encoder_hidden" not in seen


def test_every_model_option_is_a_parameter():
    params = SparseAutoencoder().get_params()
    hidden = {"encoder_hidden": (), "decoder_hidden": ()}
    for name in flashsae.models.options():
        if name != "d_sae":
            assert params[name] == hidden.get(name), name  # None keeps the architecture's default
    with pytest.raises(TypeError, match="unexpected keyword argument 'kk'; model options are the config fields"):
        SparseAutoencoder(kk=3)


def test_fewer_rows_than_a_batch(X):
    est = _fast(batch_size=4096).fit(X[:5])
    assert est.transform(X[:5]).shape == (5, 32)


def test_random_state_is_the_seed_and_global_rng_is_untouched(X):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = _fast(random_state=7).fit(X)
    assert torch.equal(torch.get_rng_state(), before)
    b = _fast(random_state=7).fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)
    c = _fast(random_state=8).fit(X)
    assert not np.array_equal(a.components_, c.components_)


def test_params_clone_and_pickle(X):
    est = _fast(k=4, architecture="topk")
    assert est.get_params()["n_components"] == 32
    assert est.set_params(k=3).k == 3
    assert clone(est).get_params() == est.get_params()
    est.fit(X)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.transform(X), est.transform(X))
    again.partial_fit(X)  # training can go on after unpickling


def test_partial_fit_keeps_the_first_standardisation_and_improves(X):
    est = _fast(k=4, epochs=1)
    est.partial_fit(X[:100])
    mean = est.model_.standardizer.mean.clone()
    first = est.score(X[200:])
    for _ in range(30):
        est.partial_fit(X[100:200])
    assert torch.equal(est.model_.standardizer.mean, mean)
    assert est.score(X[200:]) > first
    assert est.result_.steps > 30


def test_partial_fit_after_fit_continues_the_model(X):
    est = _fast(k=4).fit(X)
    W = est.model_.W_dec.detach().clone()
    est.partial_fit(X)
    assert not torch.equal(est.model_.W_dec, W)
    assert est.result_.metrics == {}


def test_partial_fit_checks_the_width(X):
    est = _fast().partial_fit(X)
    with pytest.raises(ValueError, match="X has 3 features, but SparseAutoencoder is expecting 10"):
        est.partial_fit(X[:, :3])


def _dataframe(X, columns):
    try:
        import pandas as pd

        return pd.DataFrame(X, columns=columns)
    except ImportError:
        pa = pytest.importorskip("pyarrow", reason="needs pandas or pyarrow for a dataframe")
        return pa.table({c: X[:, i] for i, c in enumerate(columns)})


def test_dataframe_feature_names(X):
    columns = [f"c{i}" for i in range(10)]
    df = _dataframe(X, columns)
    est = _fast().fit(df)
    assert list(est.feature_names_in_) == columns
    with pytest.warns(UserWarning, match="fitted with feature names"):
        est.transform(X)
    assert list(est.get_feature_names_out()[:2]) == ["sparseautoencoder0", "sparseautoencoder1"]


def test_pipeline_and_grid_search(X):
    pipe = make_pipeline(StandardScaler(), _fast(epochs=3))
    search = GridSearchCV(pipe, {"sparseautoencoder__k": [1, 4], "sparseautoencoder__architecture": ["topk"]},
                          cv=2).fit(X)
    assert search.best_params_["sparseautoencoder__k"] == 4  # more active latents reconstruct better
    assert search.transform(X).shape == (300, 32)
    # Options of other architectures in one grid are simply not passed to the topk runs.
    GridSearchCV(_fast(epochs=1), {"architecture": ["topk", "relu-l1"], "l1": [0.01]}, cv=2).fit(X)


@pytest.mark.parametrize("params, match", [
    (dict(transform_algorithm="lasso"), "transform_algorithm must be one of encoder, omp"),
    (dict(transform_algorithm="omp", decoder_hidden=(8,)), "needs a linear decoder"),
    (dict(transform_n_nonzero_coefs=0), "transform_n_nonzero_coefs must be a positive integer"),
    (dict(architecture="pca"), "unknown architecture 'pca'"),
    (dict(k=64), r"k \(64\) must not exceed the number of latents \(32\)"),
])
def test_bad_parameters(X, params, match):
    with pytest.raises(ValueError, match=match):
        _fast(**params).fit(X)


def test_inverse_transform_checks_the_width(X):
    est = _fast().fit(X)
    with pytest.raises(ValueError, match="codes have 5 columns but the model has 32 components"):
        est.inverse_transform(np.zeros((2, 5)))
