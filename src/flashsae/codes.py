"""Sparse codes in and out of files: encode a Source to CSR (.npz), decode CSR back to rows (.npy).

Both stream in chunks and write to a temporary name that is renamed when complete; encoding keeps
memory bounded by one chunk for inputs of any size (the CSR arrays grow on disk).
"""
from __future__ import annotations

import errno
import os
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from flashsae import io
from flashsae.data import iter_chunks, open_source
from flashsae.errors import DataError
from flashsae.models.base import SparseCodes

# What scipy.sparse.load_npz can raise on a hostile file (a zip archive of .npy members).
_NPZ_ERRORS = (ValueError, OSError, EOFError, KeyError, TypeError, IndexError, AttributeError, SyntaxError,
               NotImplementedError, RuntimeError, RecursionError, OverflowError, struct.error, zlib.error,
               zipfile.BadZipFile, tokenize.TokenError)


def open_for_model(model, data, *, key: str | None = None, drop_nonfinite: bool = False, progress: bool = False):
    """Open `data` for a trained model: check its width and non-finite rows; return (source, row_ids)."""
    from flashsae.preprocess import require_finite, scan

    source = open_source(data, key=key)
    if source.d_in != model.d_in:
        raise DataError(f"{source.name} has {source.d_in} columns but the model expects {model.d_in}")
    stats = scan(source, progress=progress)
    require_finite(stats, source, drop_nonfinite=drop_nonfinite)
    bad = stats.nonfinite_rows
    row_ids = np.setdiff1d(np.arange(source.n_rows, dtype=np.int64), bad) if len(bad) else None
    return source, row_ids


class CodesFile(NamedTuple):
    """What `encode_to_npz` wrote: a (rows, latents) CSR matrix with `nnz` stored values."""

    path: Path
    shape: tuple[int, int]
    nnz: int


# Rows per chunk are capped so a dense (rows, d_sae) block of codes or pre-activations stays ~64 MiB.
_MAX_CHUNK_VALUES = 1 << 24


@torch.no_grad()
def iter_code_chunks(model, source, row_ids=None, *, chunk_rows: int = 8192, progress: bool = False,
                     refine: int = 0):
    """Yield the codes of consecutive row chunks as CSR pieces (data, indices, row_nnz).

    data float32 (nnz,), indices int32 (nnz,) sorted within each row, row_nnz int64 (rows,).
    Top-k models hand over their (values, indices) directly; the dense codes are never built.
    `refine`: projected gradient steps on the chosen latents' values (`flashsae.refine`).
    """
    from flashsae.refine import check_refinable, refined_forward

    check_refinable(model, refine)
    device = model.W_dec.device
    chunk_rows = max(1, min(chunk_rows, _MAX_CHUNK_VALUES // model.d_sae))
    chunks = iter_chunks(source, row_ids, chunk_rows=chunk_rows)
    if progress:
        from tqdm.auto import tqdm

        n = source.n_rows if row_ids is None else len(row_ids)
        chunks = tqdm(chunks, total=-(-n // chunk_rows), desc="encode", unit="chunk")
    was_training = model.training
    model.eval()
    try:
        for chunk in chunks:
            x = model.standardizer(torch.from_numpy(np.ascontiguousarray(chunk)).to(device, model.W_dec.dtype))
            codes = refined_forward(model, x, refine)[0] if refine else model(x).codes
            if isinstance(codes, SparseCodes):
                order = codes.indices.argsort(dim=1)
                values = codes.values.gather(1, order)
                cols = codes.indices.gather(1, order)
                keep = values != 0
                data, indices = values[keep], cols[keep]
            else:
                keep = codes != 0
                data, indices = codes[keep], keep.nonzero()[:, 1]  # row-major: sorted within rows
            yield (data.float().cpu().numpy(), indices.to(torch.int32).cpu().numpy(),
                   keep.sum(1).cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)


def encode_to_csr(model, source, row_ids=None, *, chunk_rows: int = 8192, progress: bool = False) -> sp.csr_matrix:
    """Codes of every row (or of row_ids) as a (rows, d_sae) float32 CSR matrix, in memory."""
    data, indices, counts = [], [], []
    for d, i, c in iter_code_chunks(model, source, row_ids, chunk_rows=chunk_rows, progress=progress):
        data.append(d)
        indices.append(i)
        counts.append(c)
    counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return sp.csr_matrix((np.concatenate(data) if data else np.zeros(0, np.float32),
                          np.concatenate(indices) if indices else np.zeros(0, np.int32), indptr),
                         shape=(len(counts), model.d_sae))


def encode_to_npz(model, source, row_ids=None, path: str | os.PathLike = "codes.npz", *, chunk_rows: int = 8192,
                  progress: bool = False, refine: int = 0) -> CodesFile:
    """Stream the codes of every row (or of row_ids) into a CSR .npz that scipy.sparse.load_npz reads.

    Memory stays bounded by one chunk whatever the number of rows: the CSR arrays grow in
    temporary files next to `path` (so the disk needs about twice the output size for a moment)
    and are then copied into the .npz in 1 MiB pieces. The file appears under its name only
    when complete.
    """
    path = Path(path)
    n = source.n_rows if row_ids is None else len(row_ids)
    stem = f".{path.stem}.tmp-{os.getpid()}"
    parts = {name: path.with_name(f"{stem}-{name}") for name in ("data", "indices", "indptr", "converted")}
    try:
        with open(parts["data"], "wb") as f_data, open(parts["indices"], "wb") as f_idx:
            indptr = np.lib.format.open_memmap(parts["indptr"], mode="w+", dtype=np.int64, shape=(n + 1,))
            indptr[0] = nnz = row = 0
            for data, indices, counts in iter_code_chunks(model, source, row_ids, chunk_rows=chunk_rows,
                                                          progress=progress, refine=refine):
                f_data.write(data.tobytes())
                f_idx.write(indices.tobytes())
                indptr[row + 1:row + 1 + len(counts)] = nnz + np.cumsum(counts)
                row += len(counts)
                nnz += len(data)
        data = _open_raw(parts["data"], np.float32, nnz)
        indices = _open_raw(parts["indices"], np.int32, nnz)
        if nnz < 2**31:  # scipy wants one index dtype; int32 halves the size and what load_npz allocates
            indptr = _convert(indptr, parts["converted"], np.int32)
        else:
            indices = _convert(indices, parts["converted"], np.int64)
        with io.atomic_path(path) as tmp:  # the arrays scipy.sparse.save_npz writes, uncompressed
            _write_npz(tmp, {"indices": indices, "indptr": indptr, "format": np.array(b"csr"),
                             "shape": np.array([n, model.d_sae], dtype=np.int64), "data": data})
        return CodesFile(path, (n, model.d_sae), nnz)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left on device while writing {path}") from None
        raise
    finally:
        for part in parts.values():
            part.unlink(missing_ok=True)


def _write_npz(path: Path, arrays: dict[str, np.ndarray], piece_bytes: int = 1 << 20) -> None:
    """np.savez, but copying each (memory-mapped) array in pieces of `piece_bytes`."""
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, np.lib.format.header_data_from_array_1_0(a))
                step = max(1, piece_bytes // a.itemsize)
                flat = a.reshape(-1)
                for i in range(0, flat.size, step):
                    f.write(np.ascontiguousarray(flat[i:i + step]).tobytes())


def _open_raw(path: Path, dtype, count: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)


def _convert(a: np.ndarray, path: Path, dtype, step: int = 1 << 17) -> np.ndarray:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=a.shape)
    for i in range(0, len(a), step):
        out[i:i + step] = a[i:i + step]
    out.flush()
    return out


def save_csr(codes: sp.csr_matrix, path: str | os.PathLike) -> None:
    with io.atomic_path(path, suffix=".npz") as tmp:  # save_npz would append .npz to any other name
        sp.save_npz(tmp, codes)


def load_csr(path: str | os.PathLike, d_sae: int) -> sp.csr_matrix:
    """A CSR matrix of codes from a scipy .npz (as `flashsae encode` writes), fully validated."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    _require_sparse_npz(path)
    try:
        codes = sp.load_npz(path).tocsr()
        codes.check_format(full_check=True)  # out-of-range indices would corrupt memory in toarray()
    except MemoryError:
        raise DataError(f"{path} is too large to load into memory") from None
    except _NPZ_ERRORS as e:
        raise DataError(f"{path} is not a scipy sparse .npz file: {type(e).__name__}: {e}") from None
    if codes.dtype.kind not in "biuf":
        raise DataError(f"{path} holds {codes.dtype} values; expected real numbers")
    if codes.ndim != 2 or codes.shape[1] != d_sae:
        raise DataError(f"{path} has shape {codes.shape} but the model has {d_sae} latents")
    return codes


SPARSE_MEMBERS = ("data.npy", "indices.npy", "indptr.npy", "format.npy", "shape.npy")
"""The arrays of a scipy.sparse.save_npz file of a CSR matrix."""
WANT_CODES = "flashsae decode reads the sparse codes flashsae encode writes (scipy.sparse.save_npz)"


def _require_sparse_npz(path: Path) -> None:
    """Say what a file that cannot hold sparse codes holds instead: a .npy array, dense arrays, no archive."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise DataError(f"{path} is a dense .npy array, not sparse codes; {WANT_CODES}")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a .npz file; {WANT_CODES}")
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.endswith(".npy")]
    except _NPZ_ERRORS:
        return  # load_npz says what is wrong with it
    if "format.npy" not in members:
        names = ", ".join(n.removesuffix(".npy") for n in members[:5]) or "nothing"
        raise DataError(f"{path} holds dense arrays ({names}), not sparse codes; {WANT_CODES}")


class MappedCSR:
    """A CSR .npz whose arrays are stored uncompressed (as `encode_to_npz` writes them), memory-mapped:
    rows are read a slice at a time, so decoding needs memory for one chunk, not for the file.

    `codes[a:b]` is a validated scipy CSR matrix of rows a..b (column indices in range, row
    pointers non-decreasing); a bad slice raises DataError.
    """

    def __init__(self, path: Path, shape: tuple[int, int], data, indices, indptr):
        self.path, self.shape = path, shape
        self.data, self.indices, self.indptr = data, indices, indptr

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop, _ = rows.indices(self.shape[0])
        ptr = np.asarray(self.indptr[start:stop + 1], dtype=np.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        if np.any(np.diff(ptr) < 0) or not 0 <= lo <= hi <= len(self.data):
            raise DataError(f"{self.path} is not a valid CSR matrix: bad row pointers in rows {start}-{stop}")
        indices = np.asarray(self.indices[lo:hi])
        if len(indices) and (indices.min() < 0 or indices.max() >= self.shape[1]):
            raise DataError(f"{self.path} is not a valid CSR matrix: a column index is outside [0, {self.shape[1]}) "
                            f"in rows {start}-{stop}")
        return sp.csr_matrix((np.asarray(self.data[lo:hi]), indices, ptr - lo), shape=(stop - start, self.shape[1]))


def open_codes(path: str | os.PathLike, d_sae: int):
    """Codes for `decode_to_npy`: memory-mapped when the .npz stores its arrays uncompressed (what
    `flashsae encode` writes), else loaded and validated whole by `load_csr`."""
    path = Path(path)
    try:
        arrays = _map_stored_npz(path, ("data", "indices", "indptr", "format", "shape"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, struct.error):
        arrays = None
    if arrays is None or np.asarray(arrays["format"]).tobytes().rstrip(b"\0") != b"csr":
        return load_csr(path, d_sae)
    shape = tuple(int(v) for v in np.asarray(arrays["shape"]).reshape(-1))
    data, indices, indptr = arrays["data"], arrays["indices"], arrays["indptr"]
    if len(shape) != 2 or min(a.ndim for a in (data, indices, indptr)) != 1 or len(indptr) != shape[0] + 1 \
            or len(data) != len(indices) or data.dtype.kind not in "biuf" or indices.dtype.kind not in "iu":
        return load_csr(path, d_sae)  # whatever is odd about it, the full loader reports it
    if shape[1] != d_sae:
        raise DataError(f"{path} has shape {shape} but the model has {d_sae} latents")
    return MappedCSR(path, shape, data, indices, indptr)


def _map_stored_npz(path: Path, names: tuple[str, ...]) -> dict | None:
    """Memory maps of the named .npy members of an uncompressed .npz; None when any is compressed."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for name in names:
            info = zf.getinfo(name + ".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            if fortran or dtype.hasobject:
                return None
            count = int(np.prod(shape)) if shape else 1
            if f.tell() + count * dtype.itemsize > info.header_offset + 30 + name_len + extra_len + info.file_size:
                return None
            out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape) if count
                         else np.zeros(shape, dtype))
    return out


@torch.no_grad()
def decode_to_npy(model, codes, path: str | os.PathLike, *, chunk_rows: int = 8192) -> None:
    """Reconstructions of codes (a scipy CSR matrix or `open_codes`'s MappedCSR) written to a .npy file
    (float32), chunk by chunk."""
    with io.atomic_path(path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(codes.shape[0], model.d_in))
        for start in range(0, codes.shape[0], chunk_rows):
            block = codes[start:start + chunk_rows].toarray()
            out[start:start + len(block)] = model.decode(torch.from_numpy(block)).cpu().numpy()
        out.flush()
        del out
