"""Import every architecture module so that its @register decorator runs."""
from flashsae.models import contractive, jumprelu, kl, relu_l1, topk  # noqa: F401
