"""Sparse codes in and out of files: encode a Source to CSR (.npz), decode CSR back to rows (.npy).

Both stream in chunks and write to a temporary name that is renamed when complete.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from flashsae.data import iter_chunks, open_source
from flashsae.errors import DataError


def open_for_model(model, data, *, key: str | None = None, drop_nonfinite: bool = False, progress: bool = False):
    """Open `data` for a trained model: check its width and non-finite rows; return (source, row_ids)."""
    from flashsae.preprocess import scan

    source = open_source(data, key=key)
    if source.d_in != model.d_in:
        raise DataError(f"{source.name} has {source.d_in} columns but the model expects {model.d_in}")
    stats = scan(source, progress=progress)
    bad = stats.nonfinite_rows
    if len(bad) and not drop_nonfinite:
        raise DataError(f"{source.name}: {len(bad)} of {source.n_rows} rows contain NaN or Inf "
                        f"(first at row {int(bad[0])}); pass --drop-nonfinite to skip them")
    row_ids = np.setdiff1d(np.arange(source.n_rows, dtype=np.int64), bad) if len(bad) else None
    return source, row_ids


@torch.no_grad()
def encode_to_csr(model, source, row_ids=None, *, chunk_rows: int = 8192, progress: bool = False) -> sp.csr_matrix:
    """Codes of every row (or of row_ids) as a (rows, d_sae) float32 CSR matrix."""
    device = model.W_dec.device
    parts = []
    chunks = iter_chunks(source, row_ids, chunk_rows=chunk_rows)
    if progress:
        from tqdm.auto import tqdm

        n = source.n_rows if row_ids is None else len(row_ids)
        chunks = tqdm(chunks, total=-(-n // chunk_rows), desc="encode", unit="chunk")
    for chunk in chunks:
        codes = model.encode(torch.from_numpy(np.ascontiguousarray(chunk)).to(device)).cpu().numpy()
        parts.append(sp.csr_matrix(codes.astype(np.float32)))
    if not parts:
        return sp.csr_matrix((0, model.d_sae), dtype=np.float32)
    return sp.vstack(parts, format="csr")


def save_csr(codes: sp.csr_matrix, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    try:
        sp.save_npz(tmp, codes)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_csr(path: str | os.PathLike, d_sae: int) -> sp.csr_matrix:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        codes = sp.load_npz(path).tocsr()
    except (ValueError, OSError, KeyError) as e:
        raise DataError(f"{path} is not a scipy sparse .npz file: {e}") from None
    if codes.shape[1] != d_sae:
        raise DataError(f"{path} has {codes.shape[1]} columns but the model has {d_sae} latents")
    return codes


@torch.no_grad()
def decode_to_npy(model, codes: sp.csr_matrix, path: str | os.PathLike, *, chunk_rows: int = 8192) -> None:
    """Reconstructions of CSR codes written to a .npy file (float32), chunk by chunk."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(codes.shape[0], model.d_in))
        for start in range(0, codes.shape[0], chunk_rows):
            block = codes[start:start + chunk_rows].toarray()
            out[start:start + len(block)] = model.decode(torch.from_numpy(block)).cpu().numpy()
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
