"""Interoperability: export runs to SAELens's on-disk layout; import SAELens and sparsify directories.

SAELens (6.x) directory: `cfg.json` (d_in, d_sae, dtype, device, apply_b_dec_to_input,
normalize_activations, reshape_activations, metadata, architecture standard/topk/jumprelu, k for
topk) and `sae_weights.safetensors` with W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in),
b_dec (d_in) and threshold (d_sae) for jumprelu. Transcoders (architecture transcoder,
skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder) add d_out, have W_dec (d_sae, d_out),
b_dec (d_out), W_skip (d_out, d_in) with a skip path, and apply_b_dec_to_input false; SAELens then
computes y = act(x W_enc + b_enc) W_dec + b_dec (+ x W_skip^T). Each architecture's class says what it
exports as and what it reads back (`saelens_name`, `saelens_extras`, `saelens_options`,
`saelens_tensors`, see flashsae.models.base): this module has no per-architecture code.
sparsify directory: `cfg.json` (activation topk/groupmax, k, num_latents or expansion_factor, d_in,
normalize_decoder, skip_connection, transcode) and `sae.safetensors` with encoder.weight
(d_sae, d_in), encoder.bias, W_dec (d_sae, d_in), b_dec.

Both libraries encode raw activations, flashsae standardised ones: an export folds the
standardisation into the weights (exact), an import gets standardisation mode "none". flashsae keeps
W_enc as (d_sae, d_in), so SAELens's W_enc is transposed on the way in and out.
Imports io, models, config and errors; never imports train or cli.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flashsae import io, models
from flashsae.config import TrainConfig
from flashsae.errors import ArtifactError, ConfigError

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens >= 6 reads it as is)


@torch.no_grad()
def raw_weights(model) -> dict[str, Tensor]:
    """W_enc (d_sae, d_in), b_enc, W_dec (d_sae, d_out), b_dec (d_out) (and W_skip (d_out, d_in) with a
    skip path) acting on raw (unstandardised) rows, float32.

    With x_std = (x - mean) / scale and y = y_std * out_scale + out_mean (out_* are x's own for an SAE):
    - an SAE encodes pre = W_enc (x_std - b_dec) + b_enc = (W_enc / scale)(x - b_dec') + b_enc, where
      b_dec' = b_dec * scale + mean, so SAELens's apply_b_dec_to_input form holds with b_dec';
    - a transcoder encodes pre = W_enc x_std + b_enc = (W_enc / scale) x + (b_enc - (W_enc / scale) mean);
    - both decode y = codes (W_dec * out_scale) + b_dec * out_scale + out_mean, and a skip path
      out_scale * W_skip x_std adds W_skip' x - W_skip' mean with W_skip' = out_scale W_skip / scale.
    """
    if model.is_deep:
        raise ConfigError("models with hidden layers (--encoder-hidden/--decoder-hidden) cannot be exported: "
                          "other libraries expect one linear encoder and decoder")
    src, dst = model.standardizer, model.out_standardizer
    mean, scale = src.mean.float().cpu(), src.scale.float().cpu()
    out_mean, out_scale = dst.mean.float().cpu(), dst.scale.float().cpu()
    W_enc, b_enc = model.W_enc.float().cpu() / scale, model.b_enc.float().cpu().clone()
    W_dec, b_dec = model.W_dec.float().cpu() * out_scale, model.b_dec.float().cpu() * out_scale + out_mean
    w = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if not model.is_sae:
        w["b_enc"] = b_enc - W_enc @ mean
    W_skip = getattr(model, "W_skip", None)
    if W_skip is not None:
        w["W_skip"] = out_scale[:, None] * W_skip.float().cpu() / scale
        w["b_dec"] = b_dec - w["W_skip"] @ mean
    return w


def export_saelens(run_dir, out, *, overwrite: bool = False) -> Path:
    """Write the model in `run_dir` as a SAELens directory `out` (cfg.json + sae_weights.safetensors).

    Each architecture says what it exports as (`saelens_name()`, `saelens_extras()`). A transcoder
    (SAELens >= 6: transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder) adds
    d_out, W_skip (d_out, d_in) with a skip path, and apply_b_dec_to_input false, since b_dec is its
    output's bias.

    Raises:
        ConfigError: the architecture has no SAELens equivalent, or `out` exists.
    """
    model = io.load(run_dir)
    arch = model.architecture
    name = model.saelens_name()
    if name is None:
        exportable = [n for n in models.names() if models.get(n).saelens_names()]
        why = f" ({type(model).saelens_refusal})" if type(model).saelens_refusal else ""
        raise ConfigError(f"architecture {arch!r}{' with skip' if getattr(model.cfg, 'skip', False) else ''} "
                          f"has no SAELens equivalent{why}; exportable: {', '.join(exportable)}")
    w = raw_weights(model)
    tensors = {"W_enc": w.pop("W_enc").T.contiguous(), **w}
    extra_cfg, extra_tensors = model.saelens_extras()
    cfg = {"d_in": model.d_in, "d_sae": model.d_sae, **({} if model.is_sae else {"d_out": model.d_out}),
           "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": model.is_sae, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
                        "exported_by": f"flashsae {io.library_version()}", "flashsae_architecture": arch,
                        **_hook_metadata(model.run_config)},
           "architecture": name, **extra_cfg}
    tensors.update(extra_tensors)
    for replaced in type(model).saelens_replaces:  # written under its SAELens name among extra_tensors
        del tensors[replaced]
    return _publish(Path(out), overwrite, {SAELENS_CFG: cfg}, SAELENS_WEIGHTS, tensors)


def detect_format(path) -> str:
    """'saelens' or 'sparsify', from the files in `path`."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory")
    if (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    subdirs = sorted(p.name for p in path.iterdir()
                     if (p / SPARSIFY_WEIGHTS).is_file() or (p / SAELENS_WEIGHTS).is_file())
    hint = f"; it holds one SAE per subdirectory, pick one: {', '.join(subdirs[:8])}" if subdirs else ""
    raise ArtifactError(f"{path} is neither a SAELens directory ({SAELENS_CFG} + {SAELENS_WEIGHTS}) nor a "
                        f"sparsify directory ({SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}){hint}")


def import_dir(path, out, *, overwrite: bool = False) -> Path:
    """Convert a SAELens or sparsify directory (auto-detected) into a flashsae run directory `out`."""
    path = Path(path)
    fmt = detect_format(path)
    model = load_saelens(path) if fmt == "saelens" else load_sparsify(path)
    config = _run_config(model, {"format": fmt, "path": str(path.resolve()), **model.imported})
    work = io.prepare_out(out, overwrite=overwrite, resume=False)
    io.save_model(work, model, config)
    return io.finalize(work, out)


@torch.no_grad()
def load_saelens(path) -> "models.SparseAutoencoder":
    """A flashsae model equal to the SAELens SAE saved in `path` (codes and reconstructions match)."""
    path = Path(path)
    cfg = io.read_json(path / SAELENS_CFG)
    t = {k: v.float() for k, v in io.read_tensors(path / SAELENS_WEIGHTS).items()}
    arch = cfg.get("architecture")
    if arch is None:  # SAELens < 6 wrote no architecture: top-k lived in activation_fn_kwargs
        act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
        arch = "topk" if act == "topk" else "standard"
        if act == "topk":
            cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    where = path / SAELENS_CFG
    cls = _saelens_importer(arch, where)
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ArtifactError(f"{where}: normalize_activations={cfg['normalize_activations']!r} is not supported; "
                            "fold the normalisation into the weights first")
    try:
        arch_options = cls.saelens_options(cfg)
    except ArtifactError as e:
        raise ArtifactError(f"{where}: {e}") from None
    scaling = t.pop("scaling_factor", t.pop("finetuning_scaling_factor", None))
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ArtifactError(f"{where}: a finetuning scaling factor is not supported")
    base = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in cls.saelens_replaces]
    _require(t, (*base, *cls.saelens_tensors), path / SAELENS_WEIGHTS)
    for name in cls.saelens_replaces:  # a bias set from the architecture's own tensors below
        t[name] = torch.zeros(t["W_dec"].shape[0 if name == "b_enc" else 1])
    W_enc, b_enc, W_dec, b_dec = t["W_enc"].T.contiguous(), t["b_enc"], t["W_dec"], t["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):  # pre = x W_enc + b_enc: move b_dec out of the encoder
        b_enc = b_enc + W_enc @ b_dec
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens (TopK SAEs) scales pre-activations by ||W_dec_j|| and divides codes by it before
        # decoding: the same as encoder rows times the norms and unit decoder rows.
        norms = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    d_sae, d_in = W_dec.shape
    model = models.build(cls.architecture, d_in=d_in, d_sae=d_sae, normalize_decoder=_unit_rows(W_dec),
                         **arch_options)
    _set(model, W_enc, b_enc, W_dec, b_dec)
    model.load_saelens_tensors({name: t[name] for name in cls.saelens_tensors})
    meta = cfg.get("metadata") or {}
    model.imported = {"architecture": arch, "hook_name": meta.get("hook_name") or cfg.get("hook_name"),
                      "model_name": meta.get("model_name") or cfg.get("model_name")}
    return model.eval()


@torch.no_grad()
def load_sparsify(path) -> "models.SparseAutoencoder":
    """A flashsae TopK model equal to the sparsify SparseCoder saved in `path`."""
    path = Path(path)
    cfg = io.read_json(path / SPARSIFY_CFG)
    t = {k: v.float() for k, v in io.read_tensors(path / SPARSIFY_WEIGHTS).items()}
    where = path / SPARSIFY_CFG
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in t:
        raise ArtifactError(f"{where}: transcoders and skip connections are not sparse autoencoders flashsae can load")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ArtifactError(f"{where}: activation {activation!r} has no flashsae architecture (only topk)")
    _require(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / SPARSIFY_WEIGHTS)
    W_enc, W_dec = t["encoder.weight"], t["W_dec"]
    d_sae, d_in = W_enc.shape
    if cfg.get("d_in") not in (None, d_in) or W_dec.shape != (d_sae, d_in):
        raise ArtifactError(f"{path / SPARSIFY_WEIGHTS}: weight shapes {tuple(W_enc.shape)} and "
                            f"{tuple(W_dec.shape)} do not match d_in {cfg.get('d_in')}")
    # sparsify takes relu before top-k, flashsae after: the same codes (relu is monotone).
    model = models.build("topk", d_in=d_in, d_sae=d_sae, k=int(cfg.get("k", 32)),
                         normalize_decoder=bool(cfg.get("normalize_decoder", True)) and _unit_rows(W_dec))
    _set(model, W_enc, t["encoder.bias"], W_dec, t["b_dec"])
    model.imported = {"architecture": activation, "multi_topk": bool(cfg.get("multi_topk", False))}
    return model.eval()


def _saelens_importer(arch: str, where: Path) -> type["models.SparseAutoencoder"]:
    """The registered architecture that SAELens SAEs of architecture `arch` import as."""
    importers = {models.get(name).saelens_architecture: models.get(name) for name in models.names()
                 if models.get(name).saelens_imports}
    if arch not in importers:
        raise ArtifactError(f"{where}: SAELens architecture {arch!r} has no flashsae equivalent "
                            f"(supported: {', '.join(sorted(importers))})")
    return importers[arch]


def _set(model, W_enc, b_enc, W_dec, b_dec) -> None:
    for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        param = getattr(model, name)
        if param.shape != value.shape:
            raise ArtifactError(f"{name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        param.copy_(value)


def _require(tensors: dict, names, where: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ArtifactError(f"{where} is missing tensors {', '.join(missing)}")


def _unit_rows(W_dec: Tensor) -> bool:
    return bool(((W_dec.norm(dim=-1) - 1).abs() < 1e-3).all())


def _run_config(model, imported: dict) -> dict:
    return io.run_config(model.architecture, model.cfg, train=TrainConfig(), data={},
                         data_stats={"source": f"imported from {imported['format']}", "imported": imported},
                         resolved={"total_steps": 0, "lr": 0.0})


def _hook_metadata(run_config: dict | None) -> dict:
    """model_name / hook_name for SAELens's metadata, from the run's recorded provenance."""
    from flashsae.lm.downstream import provenance

    prov = provenance(run_config or {})
    return {"model_name": prov.get("model"), "hook_name": prov.get("hook")} if prov else {}


def _publish(out: Path, overwrite: bool, jsons: dict, weights_name: str, tensors: dict) -> Path:
    work = io.prepare_out(out, overwrite=overwrite, resume=False)
    io.write_tensors(work / weights_name, tensors)
    for name, obj in jsons.items():
        io.write_json(work / name, obj)
    return io.finalize(work, out)


__all__ = ["export_saelens", "import_dir", "load_saelens", "load_sparsify", "detect_format", "raw_weights"]
