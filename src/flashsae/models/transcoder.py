"""Transcoders (Dunefsky et al., 2024) and skip transcoders (Paulo et al., 2025).

A transcoder reads one activation (a module's input, stream `x`) and reconstructs another (the
same module's output, stream `y`) through a sparse code: it replaces the module by a dictionary of
features whose decoder atoms are the module's output directions. A skip transcoder adds a linear
path W_skip x, so the sparse code only carries what a linear map cannot. Every sparsity mechanism
of the plain SAEs works here; each is registered as its own architecture:

  transcoder            TopK (the sparse fast path)
  batchtopk-transcoder  BatchTopK, a learned threshold at inference
  jumprelu-transcoder   JumpReLU with an L0 penalty
  relu-l1-transcoder    ReLU with an L1 penalty

The encoder reads standardised x directly (b_dec is y's bias, not x's centre) and the decoder
writes standardised y; both standardisations are saved with the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flashsae.models.base import ForwardOutput, SparseAutoencoder
from flashsae.models.jumprelu import JumpReLUSAE
from flashsae.models.registry import register
from flashsae.models.relu_l1 import ReluL1SAE
from flashsae.models.topk import BatchTopKSAE, TopKSAE


@dataclass(frozen=True, kw_only=True)
class TranscoderOptions:
    skip: bool = False
    """Add a linear skip path W_skip x to the output (a skip transcoder, Paulo et al., 2025)."""


class Transcoder:
    """Mixin on an SAE class: reads stream x, reconstructs stream y, with an optional skip path."""

    inputs = ("x",)
    targets = ("y",)
    saelens_architecture = None  # an SAE architecture: a transcoder exports as one of `saelens_transcoders`
    saelens_imports = False
    # SAELens's transcoder architecture for this sparsity mechanism (without, with the skip path); None
    # where SAELens has none. SAELens transcoders encode raw x with ReLU (transcoder, skip_transcoder)
    # or JumpReLU (jumprelu_transcoder, jumprelu_skip_transcoder); it has no top-k transcoder.
    saelens_transcoders: tuple[str | None, str | None] = (None, None)
    saelens_refusal = ""  # why this mechanism has no SAELens transcoder

    @classmethod
    def saelens_names(cls) -> tuple[str, ...]:
        return tuple(name for name in cls.saelens_transcoders if name is not None)

    def saelens_name(self) -> str | None:
        return self.saelens_transcoders[bool(self.cfg.skip)]

    def __init__(self, cfg, standardizer=None):
        super().__init__(cfg, standardizer)
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, cfg.d_in))

    def skip_path(self, x: Tensor) -> Tensor | None:
        """W_skip x of standardised input, or None without the skip path."""
        return nn.functional.linear(x, self.W_skip) if self.cfg.skip else None

    def forward(self, x: Tensor, *, aux_mask=None) -> ForwardOutput:
        out = super().forward(x, aux_mask=aux_mask)
        skip = self.skip_path(x)
        if skip is None:
            return out
        return out._replace(x_hat=out.x_hat + skip, extra=tuple(e + skip for e in out.extra))


def _transcoder(name: str, base: type[SparseAutoencoder], mechanism: str,
                saelens: tuple[str | None, str | None] = (None, None), refusal: str = "") -> type[SparseAutoencoder]:
    cfg_cls = dataclasses.dataclass(frozen=True, kw_only=True)(
        type(f"{base.config_cls.__name__.removesuffix('Config')}TranscoderConfig",
             (TranscoderOptions, base.config_cls), {"__module__": __name__}))
    doc = (f"Reads a module's input x and reconstructs its output y through {mechanism} codes "
           "(Dunefsky et al., 2024); --skip adds a linear path W_skip x (Paulo et al., 2025).")
    cls = type(f"{base.__name__.removesuffix('SAE')}Transcoder", (Transcoder, base),
               {"config_cls": cfg_cls, "__doc__": doc, "__module__": __name__,
                "saelens_transcoders": saelens, "saelens_refusal": refusal})
    return register(name)(cls)


TopKTranscoder = _transcoder("transcoder", TopKSAE, "TopK",
                             refusal="SAELens has no top-k transcoder (its transcoders use ReLU or JumpReLU); "
                                     "train batchtopk-transcoder, which exports as jumprelu_transcoder")
# BatchTopK infers with one global threshold: SAELens's JumpReLU with that threshold on every latent.
BatchTopKTranscoder = _transcoder("batchtopk-transcoder", BatchTopKSAE, "BatchTopK",
                                  ("jumprelu_transcoder", "jumprelu_skip_transcoder"))
JumpReLUTranscoder = _transcoder("jumprelu-transcoder", JumpReLUSAE, "JumpReLU",
                                 ("jumprelu_transcoder", "jumprelu_skip_transcoder"))
ReluL1Transcoder = _transcoder("relu-l1-transcoder", ReluL1SAE, "ReLU + L1", ("transcoder", "skip_transcoder"))
