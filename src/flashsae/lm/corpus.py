"""Text corpora for activation capture: documents from files, then fixed-length token contexts.

A corpus is a .txt file (one document), a .jsonl file (one document per line, field "text"), a
.parquet file (column "text"), a folder of those (read in sorted order, recursively), or a
directory written by `datasets.Dataset.save_to_disk` when `datasets` is installed. Documents are
tokenised without special tokens, joined with the tokenizer's end-of-text (or separator) token
and cut into contexts of `context` tokens, each wrapped in the special tokens the tokenizer adds
to a single sequence (BERT: [CLS] ... [SEP]; GPT-2: nothing). The order is deterministic, so a
context is named by its index and a resumed harvest skips the contexts already done.
Imports only `errors`; pyarrow, datasets and transformers objects come in from callers.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flashsae.errors import ConfigError, DataError

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")
_TXT_PIECE_CHARS = 1 << 20  # .txt files are tokenised in pieces of about 1 MB, cut at line ends
_DOCS_PER_CALL = 64         # documents tokenised per fast-tokenizer call


def iter_documents(text: str | os.PathLike) -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) pieces of a corpus path (see the module docstring), in a fixed order.

    A document is one piece, except a large .txt file, which comes in pieces of about 1 MB.

    Raises:
        DataError: the path is missing, has an unsupported type or lacks a "text" field.
    """
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"corpus {text}: no such file or directory.")
    if path.is_dir():
        if _is_saved_dataset(path):
            yield from _dataset_documents(path)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS)
        if not files:
            raise DataError(f"corpus {text} has no {', '.join(TEXT_EXTENSIONS)} files.")
        for f in files:
            yield from _file_documents(f)
        return
    if path.suffix.lower() not in TEXT_EXTENSIONS:
        raise DataError(f"corpus {text}: unsupported file type {path.suffix or '(none)'!r}; "
                        f"use {', '.join(TEXT_EXTENSIONS)}, a folder of them or a saved datasets directory.")
    yield from _file_documents(path)


def _file_documents(path: Path) -> Iterator[tuple[str, bool]]:
    ext = path.suffix.lower()
    if ext == ".txt":
        # One document, streamed in pieces so that a large file never sits in memory whole.
        with open(path, encoding="utf-8", errors="replace") as f:
            piece: list[str] = []
            size = 0
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= _TXT_PIECE_CHARS:
                    yield "".join(piece), False
                    piece, size = [], 0
            yield "".join(piece), True
    elif ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {n}: not valid JSON ({e}).") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}, line {n}: expected an object with a string field \"text\".")
                yield record["text"], True
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("reading .parquet corpora needs pyarrow: pip install 'flashsae[nlp]'") from None
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path} has no column \"text\" (columns: {', '.join(pf.schema_arrow.names)}).")
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            yield from ((t, True) for t in batch.column(0).to_pylist() if t)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
        or (path / "state.json").is_file()


def _dataset_documents(path: Path) -> Iterator[tuple[str, bool]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path} looks like a saved datasets directory; reading it needs: "
                          "pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise DataError(f"dataset {path} has no column \"text\" (columns: {', '.join(ds.column_names)}).")
    for row in ds.select_columns(["text"]):
        if row["text"]:
            yield row["text"], True


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the tokenizer adds around one sequence, e.g. ([CLS], [SEP])."""
    probe = "hello world"
    body = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(body) + 1):
        if full[start:start + len(body)] == body:
            return list(full[:start]), list(full[start + len(body):])
    return [], []


def separator_id(tokenizer) -> int | None:
    """Token placed between concatenated documents: end-of-text, else separator, else none."""
    for name in ("eos_token_id", "sep_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return tid
    return None


def iter_contexts(text, tokenizer, context: int, *, start: int = 0, cycle: bool = False) -> Iterator[np.ndarray]:
    """Yield int64 arrays of `context` token ids: concatenated documents cut into contexts.

    Args:
        text: corpus path (see the module docstring).
        tokenizer: a transformers tokenizer.
        context: tokens per context, special tokens included.
        start: skip this many contexts first (resuming).
        cycle: start the corpus again when it runs out (training on the fly); otherwise stop,
            dropping a final partial context.

    Raises:
        ConfigError: `context` leaves no room for text between the special tokens.
        DataError: the corpus does not fill a single context.
    """
    prefix, suffix = special_wrapping(tokenizer)
    body = context - len(prefix) - len(suffix)
    if body < 1:
        raise ConfigError(f"context {context} leaves no room for text next to "
                          f"{len(prefix) + len(suffix)} special tokens")
    sep = separator_id(tokenizer)
    wrap_pre = np.asarray(prefix, np.int64)
    wrap_post = np.asarray(suffix, np.int64)
    index = 0
    while True:
        produced = index
        buf = np.zeros(0, np.int64)
        for ids in _token_pieces(text, tokenizer, sep):
            buf = np.concatenate([buf, ids]) if len(buf) else ids
            n_full = len(buf) // body
            for i in range(n_full):
                if index >= start:
                    yield np.concatenate([wrap_pre, buf[i * body:(i + 1) * body], wrap_post])
                index += 1
            buf = buf[n_full * body:]
        if index == produced:
            raise DataError(f"corpus {text} holds fewer than {body} tokens: not enough for one context of {context}.")
        if not cycle:
            return


def _token_pieces(text, tokenizer, sep: int | None) -> Iterator[np.ndarray]:
    pieces: list[tuple[str, bool]] = []
    for piece in iter_documents(text):
        pieces.append(piece)
        if len(pieces) == _DOCS_PER_CALL:
            yield from _encode(tokenizer, pieces, sep)
            pieces = []
    if pieces:
        yield from _encode(tokenizer, pieces, sep)


def _encode(tokenizer, pieces: list[tuple[str, bool]], sep: int | None) -> Iterator[np.ndarray]:
    # verbose=False: pieces longer than the model's maximum length are expected here.
    encoded = tokenizer([t for t, _ in pieces], add_special_tokens=False, verbose=False)["input_ids"]
    for ids, (_, ends) in zip(encoded, pieces):
        if sep is not None and ends:
            ids = [*ids, sep]
        yield np.asarray(ids, np.int64)
