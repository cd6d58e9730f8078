"""flashsae: train sparse autoencoders fast on any numeric data.

    model, result = flashsae.train("digits", arch="topk", k=8)
    codes = model.encode(x); x_hat = model.decode(codes)
    model = flashsae.load("runs/digits")
"""
__version__ = "0.1.0"

import os  # noqa: E402

# OpenMP threads that wait at a barrier sleep instead of spinning. On a machine whose cores are
# busy, spinning threads take the cores the working ones need: two threads then ran 4-8x slower
# than one (d=384, 1024 latents, load average 2 on 2 cores: 3.5-4.8k rows/s against 21-28k with
# this setting; bench/README.md). It must be set before torch loads OpenMP, so it only applies when
# flashsae is imported first (the CLI always is); an explicit OMP_WAIT_POLICY is left alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flashsae import train  # noqa: E402  (the subpackage; calling it calls train.api.train)
from flashsae.errors import ArtifactError, ConfigError, DataError, FlashSAEError  # noqa: E402
from flashsae.io import load  # noqa: E402
from flashsae.models import ForwardOutput, SparseCodes, build, names  # noqa: E402
from flashsae.models import SparseAutoencoder as SAEModule  # noqa: E402
from flashsae.train import TrainResult, train_many  # noqa: E402

# SparseAutoencoder (the estimator) comes from __getattr__ below, so importing flashsae stays light.
__all__ = ["train", "train_many", "load", "build", "names", "SparseAutoencoder", "SAEModule", "SparseCodes",  # noqa: F822
           "ForwardOutput", "TrainResult", "FlashSAEError", "ConfigError", "DataError", "ArtifactError", "__version__"]


def __getattr__(name: str):
    # The scikit-learn estimator is imported on first use, so `import flashsae` stays light.
    if name == "SparseAutoencoder":
        from flashsae.sklearn import SparseAutoencoder

        return SparseAutoencoder
    raise AttributeError(f"module 'flashsae' has no attribute {name!r}")
