"""TopK (Gao et al., 2024) and BatchTopK (Bussmann et al., 2024) sparse autoencoders.

The one-layer TopK model runs the sparse fast path: only the encoder product is dense; codes stay
(values, indices), the decoder is a gather-sum of k rows and the weight gradients touch only the
selected latents (see flashsae.kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashsae import kernels
from flashsae.errors import ArtifactError, ConfigError
from flashsae.kernels import auxk, cpu_topk
from flashsae.models.base import ForwardOutput, ModelConfig, SparseAutoencoder, SparseCodes
from flashsae.models.registry import register


@dataclass(frozen=True, kw_only=True)
class TopKConfig(ModelConfig):
    k: int = 8
    """Active latents per row."""

    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (Gao et al., 2024, App. B.1); 0 disables it."""

    k_aux: int | None = None
    """Dead latents used by AuxK per row; None picks min(d_in // 2, d_sae)."""

    auxk_budget: float = 1.0
    """AuxK's (row, latent) pairs per step at most this many times the top-k's (batch x k): with more
    dead latents than k_aux = budget x k allows, AuxK runs on that share of each shuffled batch's rows;
    0 runs it on every row."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.k > self.d_sae:
            raise ConfigError(f"k ({self.k}) must not exceed the number of latents ({self.d_sae})")
        if self.auxk_coef < 0:
            raise ConfigError(f"auxk_coef must be >= 0, got {self.auxk_coef}")
        if self.k_aux is not None and not 1 <= self.k_aux <= self.d_sae:
            raise ConfigError(f"k_aux must be in [1, d_sae], got {self.k_aux}")
        if not self.auxk_budget >= 0:
            raise ConfigError(f"auxk_budget must be >= 0, got {self.auxk_budget}")

    @property
    def effective_k_aux(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, min(self.d_in // 2, self.d_sae))


@dataclass(frozen=True, kw_only=True)
class BatchTopKConfig(TopKConfig):
    threshold_momentum: float = 0.01
    """EMA rate of the inference threshold (mean of each batch's smallest kept activation)."""


def dense_aux(pre: Tensor, aux_mask: Tensor | kernels.DeadLatents, k_aux: int) -> SparseCodes:
    """AuxK codes from dense pre-activations: the k_aux largest among the dead latents' columns, for
    the rows AuxK runs on (`DeadLatents.rows`)."""
    dead = kernels.DeadLatents.of(aux_mask)
    top, idx = auxk.select(pre[:dead.n_rows(pre.shape[0])], dead, dead.k_aux(k_aux), cpu_topk.topk)
    return SparseCodes(torch.relu(top), idx)


def add_threshold(model: torch.nn.Module) -> None:
    """Give a batch-level top-k model its inference threshold: the buffer `threshold` (saved with
    the weights) and the weight of its moving average so far (`follow_threshold`; not saved, and
    1 once a threshold is loaded, which counts as settled)."""
    model.register_buffer("threshold", torch.zeros(()))
    model.register_buffer("threshold_weight", torch.zeros(()), persistent=False)
    model.register_load_state_dict_post_hook(_threshold_settled)


def _threshold_settled(module: torch.nn.Module, incompatible_keys) -> None:
    with torch.no_grad():
        module.threshold_weight.fill_(1.0)


@torch.no_grad()
def follow_threshold(model: torch.nn.Module, kept: Tensor, momentum: float) -> None:
    """Move `model.threshold` toward the smallest activation kept in this batch.

    A bias-corrected exponential moving average (as Adam corrects its moments): with a plain
    average started at 0 the threshold stays far too low after a short run (97 steps at momentum
    0.01 gave an inference L0 of 11 for k = 3). No host synchronisation.
    """
    kept_min = torch.where(kept > 0, kept, torch.full_like(kept, float("inf"))).min()
    kept_min = torch.where(torch.isfinite(kept_min), kept_min, model.threshold)
    w = model.threshold_weight
    raw = (model.threshold * w).lerp_(kept_min, momentum)
    w.lerp_(torch.ones_like(w), momentum)
    model.threshold.copy_(raw / w)


class Thresholded:
    """Mixin of the batch-level top-k models: a learned global threshold for inference, which is
    how SAELens saves them (JumpReLU with that threshold on every latent)."""

    saelens_architecture = "jumprelu"
    saelens_tensors = ("threshold",)

    def __init__(self, cfg, standardizer=None):
        super().__init__(cfg, standardizer)
        add_threshold(self)

    def saelens_extras(self) -> tuple[dict, dict[str, Tensor]]:
        return {}, {"threshold": self.threshold.detach().float().cpu().expand(self.d_sae).clone()}


@register("topk")
class TopKSAE(SparseAutoencoder):
    """Keep the k largest ReLU pre-activations of each row (Gao et al., 2024), so L0 is exactly k;
    AuxK revives dead latents, and the one-layer model runs the sparse fast path."""

    config_cls = TopKConfig
    k_limited = True
    latent_sharding = "topk"  # shards' top k merged into the global top k (models.sharded)
    saelens_architecture = "topk"
    saelens_imports = True

    def saelens_extras(self) -> tuple[dict, dict[str, Tensor]]:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}, {}

    @classmethod
    def saelens_options(cls, cfg: dict) -> dict:
        if cfg.get("k") is None:
            raise ArtifactError("a topk SAE needs k")
        return {"k": int(cfg["k"])}

    def forward(self, x: Tensor, *, aux_mask: Tensor | kernels.DeadLatents | None = None) -> ForwardOutput:
        """`aux_mask`: the dead latents, a (d_sae,) bool mask or `kernels.DeadLatents` (AuxK then picks
        among its candidates only, at most one slot each)."""
        cfg = self.cfg
        k_aux = cfg.effective_k_aux if (aux_mask is not None and cfg.auxk_coef > 0) else 0
        shared = None
        if not self.is_deep:
            shared = {}  # lets the backward group the selected latents once for both weight gradients
            values, idx, aux_values, aux_idx = kernels.topk_encode(
                x, self.W_enc, self.b_enc, cfg.k, aux_mask=aux_mask, k_aux=k_aux,
                b_dec=self.b_dec if self.is_sae else None, shared=shared)
            codes = SparseCodes(values, idx)
            x_hat = self.decode_codes(codes, shared=shared)
            # One layer: the AuxK reconstruction is the bare gather-sum (no b_dec), whose latent grouping
            # the encoder's backward reuses too.
            aux = kernels.sparse_decode(aux_values, aux_idx, self.W_dec, shared=shared) if k_aux else None
        else:
            pre = self.pre_acts(x)
            top, idx = cpu_topk.topk(pre, cfg.k)
            codes = SparseCodes(torch.relu(top), idx)
            x_hat = self.decode_codes(codes)
            aux = self.decode_codes(dense_aux(pre, aux_mask, k_aux)) - self.b_dec if k_aux else None
        return ForwardOutput(x_hat, codes, x_hat.new_zeros(()), aux)


@register("batchtopk")
class BatchTopKSAE(Thresholded, SparseAutoencoder):
    """Keep the k * batch largest activations over the whole batch (Bussmann et al., 2024): L0 is k
    on average, more for rich rows and fewer for plain ones; inference uses a learned global threshold."""

    config_cls = BatchTopKConfig
    k_limited = True
    latent_sharding = "batchtopk"  # shards' k * batch largest merged (models.sharded)

    def forward(self, x: Tensor, *, aux_mask: Tensor | None = None) -> ForwardOutput:
        cfg = self.cfg
        pre = self.pre_acts(x)
        acts = torch.relu(pre)
        if self.training:
            flat = acts.flatten()
            top, idx = flat.topk(cfg.k * x.shape[0], sorted=False)
            codes = torch.zeros_like(flat).scatter(0, idx, top).view_as(acts)
            follow_threshold(self, top, cfg.threshold_momentum)
        else:
            codes = acts * (acts > self.threshold)
        aux = None
        k_aux = cfg.effective_k_aux if (aux_mask is not None and cfg.auxk_coef > 0) else 0
        if k_aux:
            aux = self.decode_codes(dense_aux(pre, aux_mask, k_aux)) - self.b_dec
        return ForwardOutput(self.decode_dense(codes), codes, x.new_zeros(()), aux)
