import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def small_synthetic():
    """A planted sparse dictionary small enough for quick learning tests: (X, atoms)."""
    from flashsae.data import make_synthetic

    return make_synthetic(rows=20_000, d=32, atoms=64, active=3, noise=0.01, seed=1)
