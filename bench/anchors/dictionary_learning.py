"""saprmarks dictionary_learning through its own trainSAE() loop.

trainSAE() builds its trainers itself and returns nothing, so the "trainer" entry of the config
is a small factory that builds the library's TopKTrainer / StandardTrainer and keeps a handle
on it. Batches come from our in-memory tensor (trainSAE accepts any iterable of batches).
"""
from __future__ import annotations

import contextlib
import io

import torch

from bench.anchors import common
from bench.anchors.common import BenchResult, BenchSpec

NAME = "dictionary_learning"
DIST = "dictionary-learning"
DEFAULT_WARMUP = 1000  # TopKTrainer / StandardTrainer warmup_steps
DEFAULT_SPARSITY_WARMUP = 2000  # StandardTrainer sparsity_warmup_steps


def available() -> bool:
    try:
        from dictionary_learning.trainers.standard import StandardTrainer  # noqa: F401
        from dictionary_learning.trainers.top_k import TopKTrainer  # noqa: F401
        from dictionary_learning.training import trainSAE  # noqa: F401
    except Exception:
        return False
    return True


def _train(spec: BenchSpec, settings: str, n_steps: int, X: torch.Tensor):
    """Run trainSAE for n_steps; returns (trainer, description of the knobs used)."""
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import trainSAE

    recommended = settings == "recommended"
    # The library asserts warm-up < steps; its 1000-step defaults are clamped for short runs.
    last = max(n_steps - 1, 0)
    warmup = min(spec.warmup_steps if recommended else DEFAULT_WARMUP, last)
    kwargs = dict(
        steps=n_steps,
        activation_dim=spec.d_in,
        dict_size=spec.d_sae,
        layer=0,
        lm_name="bench",
        warmup_steps=warmup,
        seed=spec.seed,
        device=spec.device,
    )
    if spec.arch == "topk":
        cls = TopKTrainer
        kwargs.update(k=spec.k, lr=spec.lr if recommended else None)
    else:
        cls = StandardTrainer
        kwargs.update(
            l1_penalty=spec.l1,
            lr=spec.lr if recommended else 1e-3,
            sparsity_warmup_steps=None if recommended else min(DEFAULT_SPARSITY_WARMUP, last),
        )
    built = []

    def factory(**cfg):
        built.append(cls(**cfg))
        return built[-1]

    bf16 = spec.use_bf16(settings)
    with contextlib.redirect_stdout(io.StringIO()):
        trainSAE(
            data=common.batch_iter(X, spec.batch_size, seed=spec.seed),
            trainer_configs=[{"trainer": factory, **kwargs}],
            steps=n_steps,
            use_wandb=False,
            save_dir=None,
            device=spec.device,
            autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        )
    trainer = built[0]
    knobs = f"{'bf16 autocast' if bf16 else 'fp32'}, lr={trainer.lr:.2g}, warmup={warmup}"
    return trainer, knobs


def _warm_up(spec: BenchSpec, settings: str, X: torch.Tensor) -> None:
    trainer, _ = _train(spec, settings, 2, X)
    del trainer
    common.free_memory(spec.device)


def run(spec: BenchSpec, X_train: torch.Tensor, X_val: torch.Tensor, *, settings: str = "recommended") -> BenchResult:
    common.set_threads()
    X = common.to_device(X_train, spec.device)
    _warm_up(common.toy_spec(spec), settings, X)  # lazy imports, thread pools: not metered
    with common.MemoryMeter(spec.device) as mem:
        _warm_up(spec, settings, X)  # untimed throwaway 2-step run with the real shapes
        with common.Timer(spec.device) as timer:
            trainer, knobs = _train(spec, settings, spec.n_steps, X)
    common.eval_precision_fp32()
    ae = trainer.ae.eval()
    metrics = common.heldout_metrics(ae.encode, ae.decode, X_val, device=spec.device)
    return common.finish(
        NAME,
        f"{settings} ({knobs})",
        spec,
        rows=spec.rows_trained,
        seconds=timer.seconds,
        peak_mb=mem.peak_mb,
        metrics=metrics,
        version=common.package_version(DIST),
        warmup="separate 2-step run, untimed",
        timed="trainSAE() incl. building its trainer and step-0 geometric-median b_dec init",
    )
