"""flashsae through its public flashsae.train() on the in-memory tensor.

Named flashsae_ so that `import flashsae` inside this module finds the library, not this file.
"""
from __future__ import annotations

import torch

from bench.anchors import common
from bench.anchors.common import BenchResult, BenchSpec

NAME = "flashsae"
DIST = "flashsae"


def available() -> bool:
    try:
        import flashsae
    except Exception:
        return False
    return callable(getattr(flashsae, "train", None))


def _known_options() -> set[str] | None:
    """Option names flashsae.train() accepts, or None when it cannot tell us."""
    try:
        from flashsae import models
        from flashsae.train import spec
    except Exception:
        return None
    fields = {name for arch in models.names() for name in spec.model_fields(arch)}
    return set(spec.ALIASES) | spec.DATA_FIELDS | spec.TRAIN_FIELDS | spec.STREAM_FIELDS | fields


def _train(spec: BenchSpec, settings: str, X: torch.Tensor, n_rows: int):
    import flashsae

    known = _known_options()
    accepts = (lambda name: True) if known is None else known.__contains__
    n_steps = n_rows // spec.batch_size
    kwargs = dict(
        arch=spec.arch,
        d_sae=spec.d_sae,
        batch_size=spec.batch_size,
        val_fraction=0.0,
        seed=spec.seed,
        device=spec.device,
        quiet=True,
        out=None,
    )
    kwargs["n_rows" if accepts("n_rows") or not accepts("rows") else "rows"] = n_rows
    # The other libraries run with logging off: log and evaluate once, at the end.
    for name in ("log_every", "eval_every"):
        if known is not None and name in known:
            kwargs[name] = max(n_steps, 1)
    if spec.arch == "topk":
        kwargs["k"] = spec.k
    else:
        kwargs["l1"] = spec.l1
    if settings == "recommended":
        kwargs.update(lr=spec.lr, dtype=spec.options.get("flashsae_dtype", spec.dtype))
        if known is not None and "lr_warmup" in known:  # a fraction of the run there
            kwargs["lr_warmup"] = spec.warmup_steps / max(n_steps, 1)
    return flashsae.train(X, **kwargs)


def _warm_up(spec: BenchSpec, settings: str, X) -> None:
    rows = 2 * spec.batch_size
    model, _ = _train(spec, settings, X[:rows], rows)
    del model
    common.free_memory(spec.device)


def run(spec: BenchSpec, X_train: torch.Tensor, X_val: torch.Tensor, *, settings: str = "recommended") -> BenchResult:
    common.set_threads()
    # flashsae streams batches from host memory (its data sources are host arrays), so on CUDA it
    # pays the host-to-device copies that the other SAE libraries, fed from a device tensor, do not.
    X = X_train.detach().cpu().float().numpy()
    _warm_up(common.toy_spec(spec), settings, X)  # lazy imports, thread pools: not metered
    with common.MemoryMeter(spec.device) as mem:
        _warm_up(spec, settings, X)  # untimed throwaway 2-step run with the real shapes
        with common.Timer(spec.device) as call:
            model, result = _train(spec, settings, X, spec.rows_trained)
    common.eval_precision_fp32()
    model.eval()
    metrics = common.heldout_metrics(
        lambda x: model.encode(x).float(), lambda c: model.decode(c).float(), X_val, device=spec.device
    )
    if settings == "recommended":
        dtype = spec.options.get("flashsae_dtype", spec.dtype)
        label = f"recommended ({'bf16' if dtype == 'bfloat16' else 'fp32'} matmuls, lr={spec.lr:g})"
    else:
        label = "defaults (flashsae.train defaults for lr and dtype)"
    return common.finish(
        NAME,
        label,
        spec,
        rows=int(getattr(result, "rows_seen", spec.rows_trained)),
        seconds=float(result.train_seconds),
        peak_mb=mem.peak_mb,
        metrics=metrics,
        version=common.package_version(DIST),
        warmup="separate 2-step train() call, untimed",
        timed="result.train_seconds (flashsae's own training timer)",
        call_seconds=call.seconds,
    )
