"""SAE architectures, registered by name. Importing this package registers every architecture."""
from flashsae.models import _all  # noqa: F401
from flashsae.models.base import ForwardOutput, ModelConfig, SparseAutoencoder, SparseCodes
from flashsae.models.registry import DEFAULT, get, names, options, register, registered, unregister

__all__ = ["ForwardOutput", "ModelConfig", "SparseAutoencoder", "SparseCodes", "DEFAULT", "get", "names", "options",
           "register", "registered", "unregister", "build"]


def build(architecture: str, standardizer=None, **options) -> SparseAutoencoder:
    """Construct a registered architecture from keyword options (fields of its config class)."""
    cls = get(architecture)
    return cls(cls.config_cls(**options), standardizer)
