"""Harvest: write one module's activations over a corpus to a resumable directory of shards.

Layout of ACTS_DIR:

    manifest.json                 model, hook, corpus, dtype, d_in, rows, context, shards, ...
    acts-00000.npy                (rows, d_in) activations (or .safetensors, tensor "activations")
    tokens/tokens-00000.npy       (rows, 3) int32: token id, context index, position
    tokens/contexts-00000.npy     (contexts, context) int32 token ids of the contexts the shard's rows
                                  come from, starting at the shard's `first_context`

A shard holds whole contexts and at most `shard_rows` rows (the last may stop inside a context when
`rows` is reached). Each shard is written to temporary names and renamed, then the manifest is
replaced atomically, so an interrupted harvest resumes after its last complete shard when run
again with the same settings. `open_source(ACTS_DIR)` reads exactly the shards the manifest lists.
Imports io, `lm.activations`, `lm.corpus` and `errors` only.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flashsae import io
from flashsae.errors import ConfigError
from flashsae.lm import activations as A
from flashsae.lm.corpus import iter_contexts

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("npy", "safetensors")
# Settings that change what is written; a resumed harvest must match them.
_SAME_ON_RESUME = ("model", "hook", "text", "context", "format", "dtype", "keep_special", "max_norm_factor")
_MANIFEST_KEY = {"format": "shard_format"}  # the manifest's own "format" names the directory layout


@dataclass(frozen=True, kw_only=True)
class HarvestConfig:
    """What to capture and how to store it."""

    model: str
    """Transformers model: a local directory or a name in the local Hugging Face cache (never downloaded)."""

    hook: str
    """Module whose output is captured, named as in model.named_modules() (e.g. transformer.h.6, encoder.layer.2)."""

    text: str
    """Corpus: a .txt, .jsonl (field "text") or .parquet (column "text") file, a folder of them, or a saved
    datasets directory."""

    rows: int
    """Activation rows (token positions) to write in total."""

    context: int = 128
    """Tokens per context (special tokens included); the corpus is concatenated and cut into contexts."""

    batch: int = 8
    """Contexts per forward pass."""

    format: str = "npy"
    """Shard file format: npy or safetensors."""

    shard_rows: int = 65536
    """At most this many rows per shard file (shards hold whole contexts)."""

    dtype: str = "float32"
    """Stored precision: float32, float16 or bfloat16 (bfloat16 needs --format safetensors)."""

    keep_special: bool = False
    """Keep rows of special tokens (BOS/EOS/PAD/CLS/SEP), which are dropped by default."""

    max_norm_factor: float | None = None
    """Drop rows whose norm exceeds this multiple of the median row norm (fitted on the first batch)."""

    device: str = "auto"
    """Device for the model: cpu, cuda, cuda:N or auto."""

    def __post_init__(self) -> None:
        for name in ("rows", "context", "batch", "shard_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be npy or safetensors, got {self.format!r}")
        if self.dtype not in STORE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        if self.dtype == "bfloat16" and self.format == "npy":
            raise ConfigError("numpy has no bfloat16: use --format safetensors with --dtype bfloat16")
        if self.shard_rows < self.context:
            raise ConfigError(f"shard_rows ({self.shard_rows}) must be at least context ({self.context}): "
                              "shards hold whole contexts")
        if self.max_norm_factor is not None and self.max_norm_factor <= 0:
            raise ConfigError(f"max_norm_factor must be > 0, got {self.max_norm_factor}")


def harvest(cfg: HarvestConfig, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Capture activations into `out` (created, resumed or, with `overwrite`, replaced).

    The model, the hook and the corpus are tried (one batch runs) before `out` is touched, so a
    command that fails on them leaves nothing behind, and an existing harvest in `out` is only
    replaced once the new one has started.

    Returns:
        The final manifest.

    Raises:
        ConfigError: `out` holds something else, or a harvest with different settings; the hook
            is not a module of the model.
        DataError: the model or corpus cannot be read.
    """
    out = Path(out)
    manifest = None if overwrite else _existing(cfg, out)
    if manifest is not None and (manifest["rows"] >= cfg.rows or manifest.get("corpus_exhausted")):
        manifest["complete"] = True
        _write_manifest(out, manifest)
        return manifest
    start = manifest["next_context"] if manifest is not None else 0
    model, tokenizer = A.load_lm(cfg.model, device=A.device_of(cfg.device))
    module = A.find_module(model, cfg.hook)
    specials = A.special_ids(tokenizer)
    row_filter = A.RowFilter(specials, keep_special=cfg.keep_special, max_norm_factor=cfg.max_norm_factor,
                             median_norm=manifest.get("median_norm") if manifest is not None else None)
    contexts = iter_contexts(cfg.text, tokenizer, cfg.context, start=start)
    blocks = A.iter_row_blocks(model, module, contexts, batch=cfg.batch, row_filter=row_filter, first_context=start)
    first = next(blocks, None)  # reads the corpus and runs the hook once: the last check before writing
    if manifest is None:
        manifest = _create(cfg, out)
    manifest.update(target_rows=cfg.rows, complete=False, special_ids=specials)
    writer = _ShardWriter(cfg, out, manifest)
    from tqdm.auto import tqdm

    with tqdm(total=cfg.rows, initial=manifest["rows"], unit="rows", unit_scale=True, desc="harvest",
              disable=not progress, dynamic_ncols=True) as bar:
        for block in itertools.chain([] if first is None else [first], blocks):
            manifest["median_norm"] = row_filter.median_norm
            bar.update(writer.add(block))
            if writer.done:
                break
        else:
            manifest["corpus_exhausted"] = True
        writer.close()
    if manifest.get("corpus_exhausted") and progress:
        print(f"harvest: the corpus ran out after {manifest['rows']} of {cfg.rows} rows")
    return manifest


def _settings(cfg: HarvestConfig) -> dict:
    """The manifest's record of the settings a resumed harvest must repeat (plus model_path)."""
    settings = {_MANIFEST_KEY.get(k, k): v for k, v in asdict(cfg).items() if k in _SAME_ON_RESUME}
    model_dir = Path(cfg.model).expanduser()
    settings["model_path"] = str(model_dir.resolve()) if model_dir.is_dir() else None
    return settings


def _existing(cfg: HarvestConfig, out: Path) -> dict | None:
    """The manifest of the harvest in `out` to resume, or None when `out` is absent or empty; writes nothing."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if (out / A.MANIFEST_FILE).is_file():
        manifest = A.read_manifest(out)
        settings = _settings(cfg)
        changed = [k for k in settings if k != "model_path" and manifest.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise ConfigError(f"{out} holds a harvest with different settings ({k}: {manifest.get(k)!r}, "
                              f"now {settings[k]!r}); pass --overwrite to start again")
        return manifest
    if any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not an activation directory; pass --overwrite to replace it")
    return None


def _create(cfg: HarvestConfig, out: Path) -> dict:
    """Start a new harvest in `out`, replacing whatever is there."""
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    (out / A.TOKENS_DIR).mkdir(parents=True)
    from flashsae import __version__

    manifest = {"format": A.MANIFEST_FORMAT, "format_version": A.MANIFEST_VERSION, **_settings(cfg),
                "d_in": None, "rows": 0, "target_rows": cfg.rows, "complete": False, "next_context": 0,
                "median_norm": None, "special_ids": [], "shards": [], "aux_files": [A.TOKENS_DIR],
                "library_version": __version__}
    _write_manifest(out, manifest)  # from here on the directory is a (resumable) harvest
    return manifest


class _ShardWriter:
    """Buffers row blocks and writes shards of whole contexts, updating the manifest after each."""

    def __init__(self, cfg: HarvestConfig, out: Path, manifest: dict):
        self.cfg, self.out, self.manifest = cfg, out, manifest
        self.acts: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.contexts: dict[int, np.ndarray] = {}
        self.pending = 0

    @property
    def done(self) -> bool:
        return self.manifest["rows"] + self.pending >= self.cfg.rows

    def add(self, block: A.RowBlock) -> int:
        """Take the block's rows (up to the target); write full shards. Returns the rows taken."""
        if self.manifest["d_in"] is None:
            self.manifest["d_in"] = int(block.acts.shape[1])
        n = min(len(block.acts), self.cfg.rows - self.manifest["rows"] - self.pending)
        self.acts.append(block.acts[:n])
        self.tokens.append(block.tokens[:n])
        for i, ctx in enumerate(block.contexts):
            self.contexts[block.first_context + i] = ctx
        self.pending += n
        while self.pending >= self.cfg.shard_rows:
            self._flush(self.cfg.shard_rows)
        return n

    def close(self) -> None:
        if self.pending:
            self._flush(self.pending)
        self.manifest["complete"] = self.done or bool(self.manifest.get("corpus_exhausted"))
        _write_manifest(self.out, self.manifest)

    def _flush(self, limit: int) -> None:
        acts, tokens = np.concatenate(self.acts), np.concatenate(self.tokens)
        cut = len(acts)
        if cut > limit:  # cut at the last context boundary that fits
            starts = np.flatnonzero(np.diff(tokens[:, 1]) != 0) + 1
            fits = starts[starts <= limit]
            cut = int(fits[-1]) if len(fits) else limit
        first, last = int(tokens[0, 1]), int(tokens[cut - 1, 1])
        index = len(self.manifest["shards"])
        ext = "npy" if self.cfg.format == "npy" else "safetensors"
        entry = {"file": f"acts-{index:05d}.{ext}", "rows": cut,
                 "tokens": f"{A.TOKENS_DIR}/tokens-{index:05d}.npy",
                 "contexts": f"{A.TOKENS_DIR}/contexts-{index:05d}.npy",
                 "first_context": first, "n_contexts": last - first + 1}
        _save_npy(self.out / entry["tokens"], tokens[:cut])
        _save_npy(self.out / entry["contexts"], np.stack([self.contexts[c] for c in range(first, last + 1)]))
        _save_acts(self.out / entry["file"], acts[:cut], self.cfg.dtype)
        self.manifest["shards"].append(entry)
        self.manifest["rows"] += cut
        self.manifest["next_context"] = last + 1
        _write_manifest(self.out, self.manifest)
        self.acts, self.tokens = [acts[cut:]], [tokens[cut:]]
        self.pending -= cut
        self.contexts = {c: v for c, v in self.contexts.items() if c > last}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _save_acts(path: Path, acts: np.ndarray, dtype: str) -> None:
    if path.suffix == ".npy":
        _save_npy(path, acts.astype(np.float16 if dtype == "float16" else np.float32, copy=False))
        return
    from safetensors.torch import save_file

    with io.atomic_path(path) as tmp:
        save_file({"activations": torch.from_numpy(acts).to(STORE_DTYPES[dtype]).contiguous()}, str(tmp))


def _write_manifest(out: Path, manifest: dict) -> None:
    io.atomic_write_text(out / A.MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
