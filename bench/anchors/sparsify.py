"""EleutherAI sparsify through its own Trainer.fit().

sparsify's Trainer only learns from activations it hooks out of a model fed with token ids, so
the "model" here is a stand-in whose submodule `rows` maps a batch of ids (row indices into our
tensor) to those rows. Each optimizer step is one pseudo-sequence holding batch_size row
indices, so sparsify's forward hook sees exactly our batches while its own loop (b_dec init,
decoder normalisation, gradient projection, optimizer, schedule, dead-latent bookkeeping, final
checkpoint) runs unchanged. TopK only: sparsify has no ReLU+L1 model.
"""
from __future__ import annotations

import contextlib
import io
import tempfile

import torch
from torch import nn

from bench.anchors import common
from bench.anchors.common import BenchResult, BenchSpec

NAME = "sparsify"
DIST = "eai-sparsify"


def available() -> bool:
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its kernel choice at import
            from sparsify import SaeConfig, TrainConfig, Trainer  # noqa: F401
    except Exception:
        return False
    return True


class _Rows(nn.Module):
    """ids (batch, seq) -> rows (batch, seq, d_in); the hookpoint sparsify trains on."""

    def __init__(self, X: torch.Tensor):
        super().__init__()
        self.register_buffer("X", X, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.X[ids]


class _StandIn(nn.Module):
    """Duck-types the bits of a transformers model sparsify's Trainer touches."""

    def __init__(self, X: torch.Tensor):
        super().__init__()
        self.rows = _Rows(X)

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.rows.X.device

    @property
    def dummy_inputs(self) -> dict:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        return self.rows(input_ids)


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.batches[i]}


def _build(spec: BenchSpec, settings: str, n_steps: int, model: _StandIn, save_dir: str):
    from sparsify import SaeConfig, TrainConfig, Trainer

    recommended = settings == "recommended"
    n_rows = model.rows.X.shape[0]
    dataset = _IndexDataset(common.batch_indices(n_rows, spec.batch_size, n_steps, seed=spec.seed))
    cfg = TrainConfig(
        SaeConfig(activation="topk", num_latents=spec.d_sae, k=spec.k),
        batch_size=1,  # one pseudo-sequence of batch_size rows per step
        loss_fn="fvu",
        optimizer="adam" if recommended else "signum",
        lr=spec.lr if recommended else None,
        lr_warmup_steps=min(spec.warmup_steps, max(n_steps - 1, 0)),
        hookpoints=["rows"],
        init_seeds=[spec.seed],
        save_every=10**12,
        save_dir=save_dir,
        log_to_wandb=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, dataset, model)
    return trainer


def _warm_up(spec: BenchSpec, settings: str, model: _StandIn, save_dir: str) -> None:
    trainer = _build(spec, settings, 2, model, save_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
    del trainer
    common.free_memory(spec.device)


def run(spec: BenchSpec, X_train: torch.Tensor, X_val: torch.Tensor, *, settings: str = "recommended") -> BenchResult:
    if spec.arch != "topk":
        return BenchResult.failed(NAME, settings, "unsupported: sparsify trains TopK only")
    common.set_threads()
    model = _StandIn(common.to_device(X_train, spec.device))
    with tempfile.TemporaryDirectory() as tmp:
        _warm_up(common.toy_spec(spec), settings, model, tmp + "/toy")  # imports, threads: not metered
        with common.MemoryMeter(spec.device) as mem:
            _warm_up(spec, settings, model, tmp + "/warmup")  # untimed 2-step run, real shapes

            trainer = _build(spec, settings, spec.n_steps, model, tmp + "/run")
            with common.Timer(spec.device) as timer, contextlib.redirect_stdout(io.StringIO()):
                trainer.fit()
    sae = next(iter(trainer.saes.values()))
    for opt in trainer.optimizers:  # ScheduleFree evaluates at its averaged iterate
        if hasattr(opt, "eval"):
            opt.eval()
    common.eval_precision_fp32()

    def encode(x: torch.Tensor) -> torch.Tensor:
        top_acts, top_indices, _ = sae.encode(x)
        codes = torch.zeros(x.shape[0], sae.num_latents, device=x.device, dtype=torch.float32)
        return codes.scatter_(1, top_indices, top_acts.float())

    def decode(codes: torch.Tensor) -> torch.Tensor:
        vals, idx = codes.topk(spec.k, dim=1, sorted=False)
        return sae.decode(vals, idx)

    with torch.no_grad():
        metrics = common.heldout_metrics(encode, decode, X_val, device=spec.device)
    precision = "bf16 autocast fwd" if spec.is_cuda else "fp32"
    if settings == "recommended":
        label = f"recommended ({precision}, adam lr={spec.lr:g}, linear decay)"
    else:
        lr = 5e-3 / (spec.d_sae / 2**14) ** 0.5  # sparsify's own rule for signum
        label = f"defaults ({precision}, signum+schedulefree lr={lr:.2g})"
    return common.finish(
        NAME,
        label,
        spec,
        rows=spec.rows_trained,
        seconds=timer.seconds,
        peak_mb=mem.peak_mb,
        metrics=metrics,
        version=common.package_version(DIST),
        warmup="separate 2-step run, untimed",
        timed="Trainer.fit() incl. its final checkpoint write",
    )
