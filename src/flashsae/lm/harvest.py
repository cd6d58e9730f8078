"""Harvest: write modules' activations over a corpus to resumable directories of shards.

Layout of ACTS_DIR (one hook; with several, one such directory per hook, ACTS_DIR/<hook>/, all
filled from the same forward passes):

    manifest.json                 model, hook, corpus, dtype, d_in, rows, context, shards, provenance, ...
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

    hook: str | tuple[str, ...]
    """Module whose output is captured, named as in model.named_modules() (e.g. transformer.h.6, encoder.layer.2);
    several are captured in one forward pass, each into its own harvest directory OUT/<hook>/."""

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

    @property
    def hooks(self) -> tuple[str, ...]:
        return (self.hook,) if isinstance(self.hook, str) else tuple(self.hook)

    def __post_init__(self) -> None:
        hooks = self.hooks
        if not hooks:
            raise ConfigError("give at least one hook")
        twice = [h for h in hooks if hooks.count(h) > 1]
        if twice:
            raise ConfigError(f"hook {twice[0]!r} is given twice")
        if len(hooks) > 1:
            bad = [h for h in hooks if not h or h.startswith(".") or "/" in h or "\\" in h]
            if bad:
                raise ConfigError(f"hook {bad[0]!r} cannot name the directory OUT/<hook>/ its harvest goes to")
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


def hook_dirs(cfg: HarvestConfig, out: str | os.PathLike) -> dict[str, Path]:
    """Where each hook's harvest goes: `out` itself for one hook, out/<hook>/ for several."""
    out = Path(out)
    return {cfg.hooks[0]: out} if len(cfg.hooks) == 1 else {h: out / h for h in cfg.hooks}


def harvest(cfg: HarvestConfig, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True) -> dict:
    """`harvest_many` for one hook: its activations in `out`. Returns the final manifest."""
    if len(cfg.hooks) > 1:
        raise ConfigError(f"{len(cfg.hooks)} hooks were given; harvest_many writes one directory per hook")
    return harvest_many(cfg, out, overwrite=overwrite, progress=progress)[cfg.hooks[0]]


def harvest_many(cfg: HarvestConfig, out: str | os.PathLike, *, overwrite: bool = False,
                 progress: bool = True) -> dict[str, dict]:
    """Capture every hook's activations into its directory (`hook_dirs`): created, resumed or replaced.

    One forward pass per batch of contexts serves all hooks. The model, the hooks and the corpus
    are tried (one batch runs) before anything is written, so a command that fails on them leaves
    nothing behind, and with `overwrite` the old harvest is removed only once the new one has started.
    Each hook's directory resumes on its own: contexts a directory already holds are skipped for it.

    Returns:
        The final manifest of each hook.

    Raises:
        ConfigError: `out` holds something else, or a harvest with different settings; a hook is
            not a module of the model.
        DataError: the model or corpus cannot be read.
    """
    out = Path(out)
    dirs = hook_dirs(cfg, out)
    if len(dirs) > 1 and not overwrite:
        _check_parent(out, dirs)
    found = {h: None if overwrite else _existing(cfg, h, d) for h, d in dirs.items()}
    done = {h: m for h, m in found.items() if m is not None and (m["rows"] >= cfg.rows or m.get("corpus_exhausted"))}
    for h, m in done.items():
        m["complete"] = True
        _write_manifest(dirs[h], m)
    todo = [h for h in dirs if h not in done]
    if not todo:
        return done
    start = min(found[h]["next_context"] if found[h] else 0 for h in todo)
    model, tokenizer = A.load_lm(cfg.model, device=A.device_of(cfg.device))
    modules = [A.find_module(model, h) for h in todo]
    specials = A.special_ids(tokenizer)
    filters = [A.RowFilter(specials, keep_special=cfg.keep_special, max_norm_factor=cfg.max_norm_factor,
                           median_norm=(found[h] or {}).get("median_norm")) for h in todo]
    contexts = iter_contexts(cfg.text, tokenizer, cfg.context, start=start)
    blocks = A.iter_row_blocks(model, modules, contexts, batch=cfg.batch, row_filters=filters, first_context=start)
    first = next(blocks, None)  # reads the corpus and runs the hooks once: the last check before writing
    if overwrite:
        _remove(out)
    writers = []
    for h, row_filter in zip(todo, filters):
        manifest = found[h] if found[h] is not None else _create(cfg, h, dirs[h])
        manifest.update(target_rows=cfg.rows, complete=False, special_ids=specials)
        manifest.setdefault("provenance", _provenance(cfg, h))  # a harvest begun by an older flashsae
        writers.append(_ShardWriter(cfg, dirs[h], manifest, row_filter))
    _run(writers, itertools.chain([] if first is None else [first], blocks), cfg.rows, progress)
    manifests = {**done, **{h: w.manifest for h, w in zip(todo, writers)}}
    return {h: manifests[h] for h in dirs}


def _run(writers: list[_ShardWriter], blocks, rows: int, progress: bool) -> None:
    """Feed each batch's blocks to the writers until every one has its rows or the corpus runs out."""
    from tqdm.auto import tqdm

    slowest = min(w.taken for w in writers)
    with tqdm(total=rows, initial=slowest, unit="rows", unit_scale=True, desc="harvest", disable=not progress,
              dynamic_ncols=True) as bar:
        for group in blocks:
            for writer, block in zip(writers, group):
                writer.add(block)
            now = min(w.taken for w in writers)
            bar.update(now - slowest)
            slowest = now
            if all(w.done for w in writers):
                break
        else:
            for writer in writers:
                writer.manifest["corpus_exhausted"] = not writer.done
        for writer in writers:
            writer.close()
    for writer in writers:
        if writer.manifest.get("corpus_exhausted") and progress:
            print(f"harvest: the corpus ran out after {writer.manifest['rows']} of {rows} rows"
                  + (f" ({writer.out})" if len(writers) > 1 else ""))


def _settings(cfg: HarvestConfig, hook: str) -> dict:
    """The manifest's record of the settings a resumed harvest must repeat (plus model_path)."""
    settings = {_MANIFEST_KEY.get(k, k): v for k, v in asdict(cfg).items() if k in _SAME_ON_RESUME}
    settings.update(hook=hook, model=os.fspath(cfg.model), text=os.fspath(cfg.text))  # a Path given as a path
    model_dir = Path(cfg.model).expanduser()
    settings["model_path"] = str(model_dir.resolve()) if model_dir.is_dir() else None
    return settings


def _check_parent(out: Path, dirs: dict[str, Path]) -> None:
    """With several hooks, `out` may hold harvest directories only (its hooks' and others')."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if (out / A.MANIFEST_FILE).is_file():
        raise ConfigError(f"{out} holds the harvest of one hook, not a directory per hook; pass --overwrite "
                          "to replace it")
    other = sorted(p.name for p in out.iterdir()
                   if p.name not in {d.name for d in dirs.values()} and not (p / A.MANIFEST_FILE).is_file())
    if other:
        raise ConfigError(f"{out} holds {other[0]!r}, which is not a harvest directory; pass --overwrite to "
                          "replace it")


def _existing(cfg: HarvestConfig, hook: str, out: Path) -> dict | None:
    """The manifest of the harvest in `out` to resume, or None when `out` is absent or empty; writes nothing."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if (out / A.MANIFEST_FILE).is_file():
        manifest = A.read_manifest(out)
        settings = _settings(cfg, hook)
        changed = [k for k in settings if k != "model_path" and manifest.get(k) != settings[k]]
        if changed:
            k = changed[0]
            raise ConfigError(f"{out} holds a harvest with different settings ({k}: {manifest.get(k)!r}, "
                              f"now {settings[k]!r}); pass --overwrite to start again")
        return manifest
    if any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not an activation directory; pass --overwrite to replace it")
    return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _create(cfg: HarvestConfig, hook: str, out: Path) -> dict:
    """Start a new harvest of `hook` in `out`, replacing whatever is there."""
    _remove(out)
    (out / A.TOKENS_DIR).mkdir(parents=True)
    from flashsae import __version__

    manifest = {"format": A.MANIFEST_FORMAT, "format_version": A.MANIFEST_VERSION, **_settings(cfg, hook),
                "d_in": None, "rows": 0, "target_rows": cfg.rows, "complete": False, "next_context": 0,
                "median_norm": None, "special_ids": [], "shards": [], "aux_files": [A.TOKENS_DIR],
                "library_version": __version__, "provenance": _provenance(cfg, hook)}
    _write_manifest(out, manifest)  # from here on the directory is a (resumable) harvest
    return manifest


class _ShardWriter:
    """Buffers one hook's row blocks and writes shards of whole contexts, updating the manifest after each."""

    def __init__(self, cfg: HarvestConfig, out: Path, manifest: dict, row_filter: A.RowFilter):
        self.cfg, self.out, self.manifest, self.row_filter = cfg, out, manifest, row_filter
        self.acts: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.contexts: dict[int, np.ndarray] = {}
        self.pending = 0

    @property
    def taken(self) -> int:
        """Rows written or buffered."""
        return self.manifest["rows"] + self.pending

    @property
    def done(self) -> bool:
        return self.taken >= self.cfg.rows

    def add(self, block: A.RowBlock) -> int:
        """Take the block's rows (up to the target) of contexts this directory lacks; write full shards.

        Returns:
            The rows taken.
        """
        self.manifest["median_norm"] = self.row_filter.median_norm
        if self.manifest["d_in"] is None:
            self.manifest["d_in"] = int(block.acts.shape[1])
        new = block.tokens[:, 1] >= self.manifest["next_context"]  # a resumed directory may be ahead of others
        n = min(int(new.sum()), self.cfg.rows - self.taken)
        self.acts.append(block.acts[new][:n])
        self.tokens.append(block.tokens[new][:n])
        for i, ctx in enumerate(block.contexts):
            if block.first_context + i >= self.manifest["next_context"]:
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


def _provenance(cfg: HarvestConfig, hook: str) -> dict:
    """Where this directory's rows come from, for the runs trained on it (`Source.provenance`).

    Paths are absolute so that `flashsae evaluate` finds the model and the corpus from any directory.
    """
    model_dir = Path(cfg.model).expanduser()
    return {"model": str(model_dir.resolve()) if model_dir.is_dir() else os.fspath(cfg.model), "hook": hook,
            "text": str(Path(cfg.text).expanduser().resolve()), "context": cfg.context,
            "keep_special": cfg.keep_special, "next_context": 0}


def _write_manifest(out: Path, manifest: dict) -> None:
    if "provenance" in manifest:
        manifest["provenance"]["next_context"] = manifest["next_context"]  # the contexts harvested so far
    io.atomic_write_text(out / A.MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
