"""Activations of one module of a transformers model: loading offline, capture by forward hook, row filters.

A model is a local directory or a name already in the local Hugging Face cache; nothing is
downloaded. A module is named as in `model.named_modules()`; its output (element 0 of a tuple)
is captured by a forward hook, and once every hooked module has run a private exception stops the
forward, so the layers after the last of them never run (one pass serves several modules).
Each token position becomes one row; special tokens (BOS/EOS/PAD/CLS/SEP, `all_special_ids`)
are dropped unless kept, and rows whose norm exceeds a multiple of the median norm can be dropped
too. Writing shards lives in `lm.harvest`, training on the fly in `lm.stream`.
Imports only `errors`; transformers is imported inside the functions that need it.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from flashsae.errors import ConfigError, DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "flashsae-activations"
MANIFEST_VERSION = 1
TOKENS_DIR = "tokens"

_NLP_HINT = "pip install 'flashsae[nlp]'"


def device_of(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None


def load_lm(name_or_path: str, *, device: str | torch.device = "cpu"):
    """Load a transformers model and its tokenizer without touching the network.

    The class named first in the checkpoint's `config.json` ("architectures") is used when
    transformers has it (so GPT2LMHeadModel keeps its LM head and its `transformer.h.N` module
    names), else AutoModel.

    Returns:
        (model in eval mode on `device`, tokenizer)

    Raises:
        ConfigError: transformers is not installed.
        DataError: the model is neither a local directory nor in the local Hugging Face cache.
    """
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"capturing activations needs transformers: {_NLP_HINT}") from None
    path = Path(name_or_path).expanduser()
    ref = str(path) if path.is_dir() else name_or_path
    try:
        config = transformers.AutoConfig.from_pretrained(ref, local_files_only=True)
        cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)),
                   transformers.AutoModel)
        model = cls.from_pretrained(ref, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load model {name_or_path!r} offline: it is not a model directory and not in "
                        f"the local Hugging Face cache ({reason})") from None
    return model.eval().to(device), tokenizer


def find_module(model, hook: str) -> torch.nn.Module:
    """The submodule named `hook` in `model.named_modules()`; a ConfigError suggests near names."""
    modules = dict(model.named_modules())
    if hook in modules and hook:
        return modules[hook]
    close = difflib.get_close_matches(hook, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        f"; for example: {', '.join(n for n in list(modules)[1:6])}"
    raise ConfigError(f"the model has no module named {hook!r}{hint} (names as in model.named_modules())")


def module_output(output) -> Tensor:
    """The activation tensor of a module's output: the output itself, or element 0 of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    """Raised by the capture hook so that the layers after the hooked module never run."""


@torch.inference_mode()
def capture(model, modules: Sequence[torch.nn.Module], ids: Tensor) -> list[Tensor]:
    """Outputs (batch, seq, d) of `modules` for token ids (batch, seq), from one forward pass.

    The forward stops as soon as every module has run, so the layers after the last of them never do.
    """
    got: dict[int, Tensor] = {}

    def hook_of(i: int):
        def hook(mod, inputs, output):
            got.setdefault(i, module_output(output))
            if len(got) == len(modules):
                raise _StopForward
        return hook

    handles = [m.register_forward_hook(hook_of(i)) for i, m in enumerate(modules)]
    try:
        model(input_ids=ids)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(got) < len(modules):
        raise DataError(f"{len(modules) - len(got)} of the hooked modules did not run during the forward pass")
    outs = [got[i] for i in range(len(modules))]
    for out in outs:
        if out.ndim != 3 or out.shape[:2] != ids.shape:
            raise DataError(f"the hooked module's output has shape {tuple(out.shape)}; expected (batch, seq, d) "
                            f"for input {tuple(ids.shape)}")
    return outs


class RowBlock(NamedTuple):
    """Rows captured from one batch of contexts."""

    acts: np.ndarray      # (rows, d_in) float32
    tokens: np.ndarray    # (rows, 3) int32: token id, context index, position in the context
    contexts: np.ndarray  # (batch, context) int32 token ids of the batch's contexts
    first_context: int    # index of contexts[0] in the corpus


class RowFilter:
    """Which token positions become rows: no special tokens (unless kept), no outlier norms.

    Args:
        special_ids: token ids to drop.
        keep_special: keep them after all.
        max_norm_factor: drop rows whose norm exceeds this multiple of the median row norm; None
            keeps every row.
        median_norm: the median to use; None fits it on the first batch seen (then fixed, so a
            resumed harvest filters the same way).
    """

    def __init__(self, special_ids: Iterable[int], *, keep_special: bool = False,
                 max_norm_factor: float | None = None, median_norm: float | None = None):
        self.special_ids = np.asarray(sorted(set(int(i) for i in special_ids)), np.int64)
        self.keep_special = keep_special
        self.max_norm_factor = max_norm_factor
        self.median_norm = median_norm

    def mask(self, token_ids: np.ndarray, acts: np.ndarray) -> np.ndarray:
        keep = np.ones(len(token_ids), bool) if self.keep_special else ~np.isin(token_ids, self.special_ids)
        if self.max_norm_factor is not None:
            norms = np.linalg.norm(acts, axis=1)
            if self.median_norm is None:
                self.median_norm = float(np.median(norms[keep])) if keep.any() else float(np.median(norms))
            keep &= norms <= self.max_norm_factor * self.median_norm
        return keep


def iter_row_blocks(model, modules: Sequence[torch.nn.Module], contexts: Iterator[np.ndarray], *, batch: int,
                    row_filters: Sequence[RowFilter], first_context: int = 0) -> Iterator[list[RowBlock]]:
    """Run the model over `contexts` in batches of `batch`; yield each batch's kept rows, one block per module.

    One forward pass per batch serves every module; module i's rows go through `row_filters[i]`.
    """
    device = next(model.parameters()).device
    index = first_context
    group: list[np.ndarray] = []
    for ctx in contexts:
        group.append(ctx)
        if len(group) == batch:
            yield _rows(model, modules, group, index, device, row_filters)
            index += len(group)
            group = []
    if group:
        yield _rows(model, modules, group, index, device, row_filters)


def _rows(model, modules, group, index, device, row_filters) -> list[RowBlock]:
    ids = np.stack(group)
    token_ids = ids.reshape(-1)
    b, t = ids.shape
    tokens = np.stack([token_ids, np.repeat(np.arange(index, index + b), t), np.tile(np.arange(t), b)], 1)
    blocks = []
    for out, row_filter in zip(capture(model, modules, torch.from_numpy(ids).to(device)), row_filters):
        acts = out.reshape(b * t, -1).float().cpu().numpy()
        keep = row_filter.mask(token_ids, acts)
        blocks.append(RowBlock(np.ascontiguousarray(acts[keep]), tokens[keep].astype(np.int32),
                               ids.astype(np.int32), index))
    return blocks


def read_manifest(acts_dir: str | Path) -> dict:
    """The manifest of an activation directory written by `flashsae harvest`."""
    path = Path(acts_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{acts_dir} has no {MANIFEST_FILE}; is it a directory written by flashsae harvest?")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} was not written by flashsae harvest")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(f"{path} has format_version {manifest.get('format_version')!r}; "
                        f"this flashsae reads version {MANIFEST_VERSION}")
    return manifest


def special_ids(tokenizer) -> list[int]:
    return sorted(set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or []))
