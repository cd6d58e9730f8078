"""SAELens through its own trainer: TopKTrainingSAE / StandardTrainingSAE + SAETrainer.fit(),
fed from our in-memory tensor through the trainer's data_provider seam (the same seam SAELens's
synthetic-data trainer uses). Its model hooking and activation store are bypassed.
"""
from __future__ import annotations

import contextlib
import io

import torch

from bench.anchors import common
from bench.anchors.common import BenchResult, BenchSpec

NAME = "saelens"
DIST = "sae-lens"
DEFAULT_LR = 3e-4  # SAETrainerConfig.lr


def available() -> bool:
    try:
        import sae_lens  # noqa: F401
        from sae_lens.training.sae_trainer import SAETrainer  # noqa: F401
    except Exception:
        return False
    return True


def _build(spec: BenchSpec, settings: str, n_steps: int, X: torch.Tensor):
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(spec.seed)
    if spec.arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=spec.d_in, d_sae=spec.d_sae, k=spec.k, device=spec.device))
    else:
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(
                d_in=spec.d_in, d_sae=spec.d_sae, l1_coefficient=spec.l1, l1_warm_up_steps=0, device=spec.device
            )
        )
    recommended = settings == "recommended"
    lr = spec.lr if recommended else DEFAULT_LR
    cfg = SAETrainerConfig(
        total_training_samples=n_steps * spec.batch_size,
        train_batch_size_samples=spec.batch_size,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=min(spec.warmup_steps, max(n_steps - 1, 0)) if recommended else 0,
        device=spec.device,
        autocast=spec.use_bf16(settings),
        logger=LoggingConfig(log_to_wandb=False),
    )
    data = common.batch_iter(X, spec.batch_size, seed=spec.seed)
    return SAETrainer(cfg=cfg, sae=sae, data_provider=data), cfg


def _warm_up(spec: BenchSpec, settings: str, X: torch.Tensor) -> None:
    trainer, _ = _build(spec, settings, 2, X)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
    del trainer
    common.free_memory(spec.device)


def run(spec: BenchSpec, X_train: torch.Tensor, X_val: torch.Tensor, *, settings: str = "recommended") -> BenchResult:
    common.set_threads()
    X = common.to_device(X_train, spec.device)
    _warm_up(common.toy_spec(spec), settings, X)  # lazy imports, thread pools: not metered
    with common.MemoryMeter(spec.device) as mem:
        _warm_up(spec, settings, X)  # untimed throwaway 2-step run with the real shapes

        trainer, cfg = _build(spec, settings, spec.n_steps, X)
        with common.Timer(spec.device) as timer:
            sae = trainer.fit()
    common.eval_precision_fp32()
    sae.eval()
    metrics = common.heldout_metrics(sae.encode, sae.decode, X_val, device=spec.device)
    label = (
        f"{settings} ({'bf16 autocast' if cfg.autocast else 'fp32'}, adam lr={cfg.lr:g}, constant)"
    )
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
        timed="SAETrainer.fit()",
    )
