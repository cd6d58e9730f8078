"""RunningMetrics: sums taken in the standardised space, per chunk in float32, give the float64
data-unit metrics to float rounding, whatever the chunking, also for columns with a large mean."""
import numpy as np
import pytest
import torch

from flashsae.data import open_source
from flashsae.eval.metrics import RunningMetrics
from flashsae.preprocess import Standardizer, scan


@pytest.mark.parametrize("mode", ["column", "global", "norm", "none"])
@pytest.mark.parametrize("chunk", [1000, 333])
def test_metrics_match_a_float64_computation_in_data_units(mode, chunk):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3000, 6)) * [0.01, 1, 5, 1, 2, 0.5] + [1e3, 0, -40, 2, 0, 7]).astype(np.float32)
    std = Standardizer.from_scan(scan(open_source(x)), mode)
    x_hat = (x + rng.normal(size=x.shape).astype(np.float32) * 0.1 * x.std(0)).astype(np.float32)
    codes = torch.from_numpy(rng.normal(size=(3000, 8)).astype(np.float32)).relu()
    m = RunningMetrics(6, 8, "cpu", scale=None if mode == "none" else std.scale)
    for a in range(0, 3000, chunk):
        m.update(std(torch.from_numpy(x[a:a + chunk])), std(torch.from_numpy(x_hat[a:a + chunk])), codes[a:a + chunk])
    got = m.result()
    xd, hd = x.astype(np.float64), x_hat.astype(np.float64)
    sse = ((xd - hd) ** 2).sum()
    var = ((xd - xd.mean(0)) ** 2).sum()
    assert got["rows"] == 3000
    assert got["mse"] == pytest.approx(sse / x.size, rel=1e-5)
    assert got["fvu"] == pytest.approx(sse / var, rel=1e-5)
    s = std(torch.from_numpy(x)).double().numpy()
    sh = std(torch.from_numpy(x_hat)).double().numpy()
    assert got["fvu_standardized"] == pytest.approx(((s - sh) ** 2).sum() / ((s - s.mean(0)) ** 2).sum(), rel=1e-5)
    assert got["l0"] == pytest.approx(float((codes != 0).sum(1).double().mean()))
