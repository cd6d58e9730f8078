"""A plain PyTorch TopK SAE loop, the baseline anyone writes in an afternoon.

Tied-transpose init with unit decoder rows, b_dec at the data mean, the top-k of a ReLU encoder,
squared error, Adam with a linear decay over the last fifth, decoder rows renormalised after each
step. No dead-latent revival, no fused kernels: what a careful reader of the TopK paper would write.
"""
from __future__ import annotations

import torch

from bench.anchors import common
from bench.anchors.common import BenchResult, BenchSpec

NAME = "plain"


def available() -> bool:
    return True


class TopKSAE(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, b_dec: torch.Tensor):
        super().__init__()
        W = torch.randn(d_sae, d_in)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W)
        self.W_enc = torch.nn.Parameter(W.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, top.indices, top.values)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec


def _train(spec: BenchSpec, n_steps: int, X: torch.Tensor) -> TopKSAE:
    torch.manual_seed(spec.seed)
    sae = TopKSAE(spec.d_in, spec.d_sae, spec.k, X[:65536].mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=spec.lr)
    decay_from = int(0.8 * n_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(n_steps - s, 0) / max(n_steps - decay_from, 1))
    for x in common.batch_iter(X, spec.batch_size, seed=spec.seed, n_batches=n_steps):
        loss = (sae.decode(sae.encode(x)) - x).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae


def run(spec: BenchSpec, X_train: torch.Tensor, X_val: torch.Tensor, *, settings: str = "recommended") -> BenchResult:
    common.set_threads()
    if spec.arch != "topk":
        return BenchResult.failed(NAME, settings, "unsupported: the plain loop trains TopK only")
    X = common.to_device(X_train, spec.device)
    with common.MemoryMeter(spec.device) as mem, common.Timer(spec.device) as timer:
        sae = _train(spec, spec.n_steps, X)
    common.eval_precision_fp32()
    metrics = common.heldout_metrics(sae.encode, sae.decode, X_val, device=spec.device)
    return common.finish(NAME, f"{settings} (fp32, adam lr={spec.lr:g}, linear decay)", spec,
                         rows=spec.rows_trained, seconds=timer.seconds, peak_mb=mem.peak_mb, metrics=metrics,
                         version=torch.__version__, warmup="none", timed="the whole loop")
