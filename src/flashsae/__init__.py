"""flashsae: train sparse autoencoders fast on any numeric data.

    model, result = flashsae.train("digits", arch="topk", k=8)
    codes = model.encode(x); x_hat = model.decode(codes)
    model = flashsae.load("runs/digits")

The public names are imported on first use (module `__getattr__`), so `import flashsae` and the
command line's start-up (`flashsae --help`) do not load torch; only the errors are imported here.
"""
__version__ = "0.1.0"

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING

# OpenMP threads that wait at a barrier sleep instead of spinning. On a machine whose cores are
# busy, spinning threads take the cores the working ones need: two threads then ran 4-8x slower
# than one (d=384, 1024 latents, load average 2 on 2 cores: 3.5-4.8k rows/s against 21-28k with
# this setting; bench/README.md). It must be set before torch loads OpenMP, so it only applies when
# flashsae is imported first (the CLI always is); an explicit OMP_WAIT_POLICY is left alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flashsae.errors import ArtifactError, ConfigError, DataError, FlashSAEError  # noqa: E402

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from flashsae import train
    from flashsae.io import load
    from flashsae.models import ForwardOutput, SparseCodes, build, names
    from flashsae.models import SparseAutoencoder as SAEModule
    from flashsae.sklearn import SparseAutoencoder
    from flashsae.train import TrainResult, train_many

_LAZY = {  # public name -> (module, attribute in it; None for the module itself)
    "train": ("flashsae.train", None),  # the subpackage; calling it calls train.api.train
    "train_many": ("flashsae.train", "train_many"),
    "TrainResult": ("flashsae.train", "TrainResult"),
    "load": ("flashsae.io", "load"),
    "build": ("flashsae.models", "build"),
    "names": ("flashsae.models", "names"),
    "ForwardOutput": ("flashsae.models", "ForwardOutput"),
    "SparseCodes": ("flashsae.models", "SparseCodes"),
    "SAEModule": ("flashsae.models", "SparseAutoencoder"),
    "SparseAutoencoder": ("flashsae.sklearn", "SparseAutoencoder"),  # the scikit-learn estimator
}

__all__ = ["train", "train_many", "load", "build", "names", "SparseAutoencoder", "SAEModule", "SparseCodes",  # noqa: F822
           "ForwardOutput", "TrainResult", "FlashSAEError", "ConfigError", "DataError", "ArtifactError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        module_name, attr = f"{__name__}.{name}", None  # a subpackage, as `flashsae.models` after `import flashsae`
    else:
        raise AttributeError(f"module 'flashsae' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
