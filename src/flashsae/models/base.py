"""Shared SAE machinery: parameters, optional deep encoder/decoder, decoder constraint, public encode/decode.

Weights have one layout everywhere: W_enc (d_sae, d_in) and W_dec (d_sae, d_in), so latent j owns
the contiguous rows W_enc[j] and W_dec[j] (its dictionary atom); b_enc (d_sae), b_dec (d_in). A model
that reconstructs another stream than it reads (a transcoder) has W_dec (d_sae, d_out) and b_dec (d_out).
With hidden layers, d_in above is the width next to the code layer and the input/output layers
live in `enc_layers` / `dec_layers`. Imports only config-level modules and kernels.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from flashsae.errors import ConfigError
from flashsae.preprocess import Standardizer


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Options shared by every architecture."""

    d_in: int
    """Input width (number of columns); set from the data."""

    d_sae: int
    """Number of latents (dictionary size)."""

    d_out: int | None = None
    """Width of the reconstructed stream when it is not the input (a transcoder's output), set from
    the data; None: d_in."""

    encoder_hidden: tuple[int, ...] = ()
    """Widths of ReLU hidden layers before the code layer (deep encoder); empty for one layer."""

    decoder_hidden: tuple[int, ...] = ()
    """Widths of ReLU hidden layers after the code layer (deep decoder); empty for one layer."""

    normalize_decoder: bool = True
    """Keep decoder rows at unit norm (gradient projection + renormalisation after each step)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_hidden", tuple(int(h) for h in self.encoder_hidden))
        object.__setattr__(self, "decoder_hidden", tuple(int(h) for h in self.decoder_hidden))
        for name in ("d_in", "d_sae", "d_out"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for h in self.encoder_hidden + self.decoder_hidden:
            if h < 1:
                raise ConfigError(f"hidden layer widths must be >= 1, got {h}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["encoder_hidden"] = list(self.encoder_hidden)
        d["decoder_hidden"] = list(self.decoder_hidden)
        return d


class SparseCodes(NamedTuple):
    values: Tensor   # (batch, k), >= 0
    indices: Tensor  # (batch, k) int64

    def to_dense(self, d_sae: int) -> Tensor:
        out = self.values.new_zeros((self.values.shape[0], d_sae))
        return out.scatter_(1, self.indices, self.values)


Codes = Tensor | SparseCodes


class ForwardOutput(NamedTuple):
    x_hat: Tensor           # (batch, d_in), standardised space
    codes: Codes            # dense (batch, d_sae) or SparseCodes
    penalty: Tensor         # weighted sparsity term, scalar; zero for top-k models
    aux: Tensor | None = None       # AuxK reconstruction of the residual (batch, d_in), or None
    # Further reconstructions of the target, each adding its mean squared error to the loss
    # (Matryoshka's smaller prefixes, the Gated SAE's path through the frozen decoder).
    extra: tuple[Tensor, ...] = ()


class SparseAutoencoder(nn.Module):
    """Base class. Subclasses implement `activate(pre_acts)` (or override `forward`)."""

    architecture = "base"
    config_cls: type[ModelConfig] = ModelConfig
    k_limited = False     # at most k latents fire per row (top-k family)
    supports_hidden = True  # takes encoder_hidden / decoder_hidden (refused in its config otherwise)
    # The named streams of a batch the model reads (`inputs`) and reconstructs (`targets`): an SAE
    # reads and reconstructs x; a model that maps one activation to another reads x and writes y.
    inputs: tuple[str, ...] = ("x",)
    targets: tuple[str, ...] = ("x",)
    # SAELens's format (flashsae.interop): the SAELens inference architecture this model exports as
    # (standard, topk or jumprelu), None when it has none (export refuses); and whether SAELens SAEs
    # of that architecture import as this one (one flashsae architecture per SAELens architecture).
    saelens_architecture: str | None = None
    saelens_imports = False
    saelens_tensors: tuple[str, ...] = ()  # tensors beyond W_enc, b_enc, W_dec, b_dec in its files
    saelens_replaces: tuple[str, ...] = ()  # b_enc and/or b_dec when its files name them otherwise
    saelens_refusal = ""  # why export refuses, where more can be said than "no SAELens equivalent"

    def __init__(self, cfg: ModelConfig, standardizer: Standardizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.standardizer = standardizer if standardizer is not None else Standardizer(cfg.d_in, "none")
        # A model that reconstructs another stream than it reads keeps that stream's standardisation too.
        self.target_standardizer = Standardizer(self.d_out, self.standardizer.mode) \
            if not self.is_sae else None
        enc_dims = (cfg.d_in, *cfg.encoder_hidden)
        dec_dims = (*cfg.decoder_hidden, self.d_out)
        self.enc_layers = nn.ParameterList()
        for fan_in, fan_out in zip(enc_dims[:-1], enc_dims[1:]):
            self.enc_layers.append(nn.Parameter(_kaiming(fan_out, fan_in)))
            self.enc_layers.append(nn.Parameter(torch.zeros(fan_out)))
        self.dec_layers = nn.ParameterList()
        for fan_in, fan_out in zip(dec_dims[:-1], dec_dims[1:]):
            self.dec_layers.append(nn.Parameter(_kaiming(fan_out, fan_in)))
            self.dec_layers.append(nn.Parameter(torch.zeros(fan_out)))
        code_in, code_out = enc_dims[-1], dec_dims[0]
        W_dec = torch.randn(cfg.d_sae, code_out)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # Tied initialisation W_enc = W_dec^T (Gao et al., 2024) when the shapes allow it. Without a cap on
        # active latents about half of them fire at first and each adds ~x/(2 d_in): scale the encoder by
        # 2 d_in / d_sae so that the first reconstructions have the data's scale instead of d_sae/(2 d_in) times it.
        scale = 1.0 if self.k_limited else min(1.0, 2 * code_out / cfg.d_sae)
        # A one-layer model of another stream (a transcoder) has no tie: it starts from random unit rows
        # at the same scale, which learned faster than He initialisation (y = x on planted data, 60k
        # rows: held-out FVU 0.29 against 0.39; the tied SAE 0.25).
        if code_in == code_out and self.is_sae:
            W_enc = W_dec.clone() * scale
        elif not self.is_deep:
            W_enc = torch.randn(cfg.d_sae, code_in)
            W_enc *= scale / W_enc.norm(dim=-1, keepdim=True)
        else:
            W_enc = _kaiming(cfg.d_sae, code_in)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))

    # ---- shape helpers -------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the reconstruction: d_in for an SAE, the target stream's for a transcoder."""
        return self.cfg.d_out or self.cfg.d_in

    @property
    def is_sae(self) -> bool:
        """Whether the model reconstructs the stream it reads."""
        return self.targets[0] == self.inputs[0]

    @property
    def out_standardizer(self) -> Standardizer:
        """The standardisation of the stream the model reconstructs (its input's, for an SAE)."""
        return self.target_standardizer if self.target_standardizer is not None else self.standardizer

    @property
    def is_deep(self) -> bool:
        return bool(self.cfg.encoder_hidden or self.cfg.decoder_hidden)

    # ---- building blocks (standardised space) ---------------------------------------------
    def encoder_trunk(self, x: Tensor) -> Tensor:
        """x - b_dec (x alone when b_dec is another stream's bias) through the hidden encoder layers:
        (batch, width next to the code layer)."""
        h = x - self.b_dec if self.is_sae else x
        for i in range(0, len(self.enc_layers), 2):
            h = torch.relu(nn.functional.linear(h, self.enc_layers[i], self.enc_layers[i + 1]))
        return h

    def pre_acts(self, x: Tensor) -> Tensor:
        h = self.encoder_trunk(x)
        return nn.functional.linear(h, self.W_enc, self.b_enc)  # (batch, d_sae)

    def decode_dense(self, codes: Tensor) -> Tensor:
        y = codes @ self.W_dec
        return self._decoder_tail(y)

    def _decoder_tail(self, y: Tensor) -> Tensor:
        for i in range(0, len(self.dec_layers), 2):
            y = nn.functional.linear(torch.relu(y), self.dec_layers[i], self.dec_layers[i + 1])
        return y + self.b_dec

    def decode_codes(self, codes: Codes, *, shared: dict | None = None) -> Tensor:
        """Reconstruction of codes; `shared`: the dict the top-k encoder got (`kernels.topk_encode`)."""
        if isinstance(codes, SparseCodes):
            from flashsae import kernels

            y = kernels.sparse_decode(codes.values, codes.indices, self.W_dec, shared=shared)
            return self._decoder_tail(y)
        return self.decode_dense(codes)

    def activate(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """Return (dense codes, weighted penalty) from pre-activations. Overridden per architecture."""
        raise NotImplementedError

    def forward(self, x: Tensor, *, aux_mask: Tensor | None = None) -> ForwardOutput:
        """One training/inference pass on standardised input x (batch, d_in)."""
        codes, penalty = self.activate(self.pre_acts(x))
        return ForwardOutput(self.decode_dense(codes), codes, penalty)

    def encode_std(self, x: Tensor) -> Tensor:
        """Dense inference codes (batch, d_sae) of standardised input."""
        out = self.forward(x)
        return out.codes.to_dense(self.d_sae) if isinstance(out.codes, SparseCodes) else out.codes

    # ---- public API in the data's own units ------------------------------------------------
    @torch.no_grad()
    def encode(self, x) -> Tensor:
        """Codes (batch, d_sae) of raw input rows (the fitted standardisation is applied first)."""
        x = self._as_input(x)
        return self.encode_std(self.standardizer(x))

    @torch.no_grad()
    def decode(self, codes) -> Tensor:
        """Reconstruction in the data's own units from codes (batch, d_sae)."""
        codes = torch.as_tensor(codes, dtype=self.W_dec.dtype, device=self.W_dec.device)
        if codes.ndim != 2 or codes.shape[1] != self.d_sae:
            from flashsae.errors import DataError

            raise DataError(f"codes must have shape (rows, {self.d_sae}), got {tuple(codes.shape)}")
        return self.out_standardizer.inverse(self.decode_dense(codes))

    @torch.no_grad()
    def reconstruct(self, x) -> Tensor:
        """The model's output for raw rows, in its target's units: one forward pass (a transcoder's
        skip path included), not an encode and a second decode."""
        return self.out_standardizer.inverse(self(self.standardizer(self._as_input(x))).x_hat)

    def _as_input(self, x) -> Tensor:
        from flashsae.errors import DataError

        x = torch.as_tensor(x, device=self.W_dec.device)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise DataError(f"input has shape {tuple(x.shape)} but the model expects (rows, {self.d_in}) columns")
        return x.to(self.W_dec.dtype)

    # ---- decoder constraint (Bricken et al., 2023; Gao et al., 2024) -------------------------
    @torch.no_grad()
    def constrain_decoder_grad(self) -> None:
        """Drop the radial component of the decoder-row gradients (rows are unit norm)."""
        if self.cfg.normalize_decoder and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g.sub_((g * W).sum(-1, keepdim=True) * W)

    @torch.no_grad()
    def constrain_decoder(self) -> None:
        if self.cfg.normalize_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def atoms(self) -> Tensor:
        """Dictionary atoms (d_sae, d_in) in the data's own units (direction of each latent's output)."""
        if self.is_deep:
            base = self.decode(torch.zeros(1, self.d_sae, device=self.W_dec.device))
            eye = torch.eye(self.d_sae, device=self.W_dec.device)
            return self.decode(eye) - base
        return self.W_dec * self.out_standardizer.scale

    # ---- SAELens's format (flashsae.interop) ---------------------------------------------------
    @classmethod
    def saelens_names(cls) -> tuple[str, ...]:
        """Every SAELens architecture this class can export as (its options pick one: `saelens_name`)."""
        return (cls.saelens_architecture,) if cls.saelens_architecture is not None else ()

    def saelens_name(self) -> str | None:
        """The SAELens architecture this model exports as; None when it has none (export refuses)."""
        return type(self).saelens_architecture

    def saelens_extras(self) -> tuple[dict, dict[str, Tensor]]:
        """cfg.json fields and the `saelens_tensors` of the export, beyond what every export writes.

        Tensors act on pre-activations, which the export leaves unchanged when it folds the
        standardisation into the weights.
        """
        return {}, {}

    @classmethod
    def saelens_options(cls, cfg: dict) -> dict:
        """Config options (besides d_in, d_sae, normalize_decoder) of a SAELens SAE, from its cfg.json.

        Raises:
            ArtifactError: the SAE uses a variant this architecture cannot represent.
        """
        return {}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Set this model's own parameters from the `saelens_tensors` of a SAELens file."""


def _kaiming(fan_out: int, fan_in: int) -> Tensor:
    return torch.randn(fan_out, fan_in) * math.sqrt(2.0 / fan_in)
