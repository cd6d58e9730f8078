import warnings

import numpy as np
import pytest
import torch

from flashsae.data import open_source
from flashsae.errors import ConfigError
from flashsae.preprocess import Scan, Standardizer, scan


@pytest.fixture
def x():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1000, 6)) * [1, 2, 3, 0.1, 10, 5] + [0, 1, -2, 100, 3, 0]).astype(np.float32)


def test_scan_matches_numpy_across_chunks(x):
    s = scan(open_source(x), chunk_rows=64)  # 16 chunks, the last one partial
    x64 = x.astype(np.float64)
    assert s.n_rows == 1000 and s.n_finite == 1000 and s.nonfinite_rows.size == 0
    np.testing.assert_allclose(s.mean, x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.var, x64.var(0), rtol=1e-10)
    np.testing.assert_allclose(s.mean_sq_norm, (x64**2).sum(1).mean(), rtol=1e-12)
    assert s.mean.dtype == s.var.dtype == np.float64


def test_scan_finds_nonfinite_rows_and_ignores_them(x):
    bad = np.array([0, 63, 64, 500, 999])
    y = x.copy()
    y[0, 1], y[63, 0], y[64, 5], y[500, 2], y[999, 3] = np.nan, np.inf, -np.inf, np.nan, np.inf
    s = scan(open_source(y), chunk_rows=64, progress=True)
    np.testing.assert_array_equal(s.nonfinite_rows, bad)
    assert s.nonfinite_rows.dtype == np.int64 and s.n_finite == 995
    good = np.delete(x, bad, axis=0).astype(np.float64)
    np.testing.assert_allclose(s.mean, good.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.var, good.var(0), rtol=1e-10)


def test_scan_finds_opposite_infinities_in_one_column_of_one_chunk(x):
    y = x.copy()
    y[10, 4], y[20, 4] = np.inf, -np.inf  # the column's sum is NaN, not an infinity
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no RuntimeWarning reaches the user
        s = scan(open_source(y), chunk_rows=64)
    np.testing.assert_array_equal(s.nonfinite_rows, [10, 20])
    np.testing.assert_allclose(s.mean, np.delete(x, [10, 20], axis=0).astype(np.float64).mean(0), rtol=1e-12)


def test_scan_of_all_nonfinite_rows_is_identity_standardizer():
    s = scan(open_source(np.full((3, 2), np.nan, np.float32)))
    assert s.n_finite == 0 and s.mean_sq_norm == 0.0
    for mode in Standardizer.MODES:
        z = Standardizer.from_scan(s, mode)
        assert torch.all(z.mean == 0) and torch.all(z.scale == 1)


@pytest.mark.parametrize("mode", Standardizer.MODES)
def test_inverse_undoes_forward(x, mode):
    z = Standardizer.from_scan(scan(open_source(x)), mode)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(z.inverse(z(t)).numpy(), x, rtol=1e-5, atol=1e-4)
    assert z(t.double()).dtype == torch.float64
    assert z(t.bfloat16()).dtype == torch.bfloat16


def test_column_mode_gives_zero_mean_unit_std(x):
    z = Standardizer.from_scan(scan(open_source(x), chunk_rows=100), "column")
    y = z(torch.from_numpy(x)).double()
    # float32 limit: column 3 has mean 100 (ulp 8e-6) and std 0.1, so ~1e-4 in standard units
    np.testing.assert_allclose(y.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(0, unbiased=False).numpy(), 1, rtol=1e-5)


def test_global_mode_keeps_relative_column_scales(x):
    z = Standardizer.from_scan(scan(open_source(x)), "global")
    y = z(torch.from_numpy(x)).double()
    np.testing.assert_allclose(y.mean(0).numpy(), 0, atol=1e-5)
    assert torch.all(z.scale == z.scale[0])
    np.testing.assert_allclose(y.var(0, unbiased=False).mean().item(), 1, rtol=1e-5)
    ratio = y.std(0) / torch.from_numpy(x).double().std(0)
    np.testing.assert_allclose(ratio.numpy(), ratio[0].item(), rtol=1e-5)


def test_norm_mode_makes_mean_squared_row_norm_d(x):
    z = Standardizer.from_scan(scan(open_source(x)), "norm")
    assert torch.all(z.mean == 0) and torch.all(z.scale == z.scale[0])
    y = z(torch.from_numpy(x)).double()
    np.testing.assert_allclose(y.pow(2).sum(1).mean().item(), 6, rtol=1e-5)


def test_none_mode_and_unfitted_are_identity(x):
    t = torch.from_numpy(x)
    assert torch.equal(Standardizer(6, "none")(t), t)
    assert torch.equal(Standardizer(6)(t), t)
    assert torch.equal(Standardizer.from_scan(scan(open_source(x)), "none")(t), t)


def test_constant_columns_get_unit_scale():
    n = 70_000  # several chunks of a column whose float64 mean is not exactly 0.1
    x = np.stack([np.full(n, 0.1), np.zeros(n), np.arange(n) % 7], axis=1).astype(np.float32)
    s = scan(open_source(x), chunk_rows=30_000)
    z = Standardizer.from_scan(s, "column")
    np.testing.assert_allclose(z.scale[:2].numpy(), 1.0)
    y = z(torch.from_numpy(x))
    assert torch.isfinite(y).all() and y[:, :2].abs().max() < 1e-6


def test_state_dict_round_trip_and_mode_errors(x):
    z = Standardizer.from_scan(scan(open_source(x)), "column")
    fresh = Standardizer(6, "column")
    fresh.load_state_dict(z.state_dict())
    assert set(z.state_dict()) == {"mean", "scale"}
    assert z.mean.dtype == z.scale.dtype == torch.float32
    t = torch.from_numpy(x)
    assert torch.equal(fresh(t), z(t))
    with pytest.raises(ConfigError,
                       match="unknown standardization mode 'l2'; choose one of: column, global, norm, none"):
        Standardizer(6, "l2")
    with pytest.raises(ConfigError, match="unknown standardization mode 'zscore'"):
        Standardizer.from_scan(Scan(1, np.zeros(0, np.int64), np.zeros(2), np.ones(2), 2.0), "zscore")
