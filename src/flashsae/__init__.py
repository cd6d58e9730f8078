"""flashsae: train sparse autoencoders fast on any numeric data.

    model, result = flashsae.train("digits", arch="topk", k=8)
    codes = model.encode(x); x_hat = model.decode(codes)
    model = flashsae.load("runs/digits")
"""
__version__ = "0.1.0"

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
