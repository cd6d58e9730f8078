"""Sources: row-addressable numeric data (arrays, .npy memmaps, .npz, CSV/TSV, safetensors, shards).

A Source hands out float32 rows by range (`read`) or by index (`take`) and never loads a
memory-mappable file whole. Non-finite rows are kept here; `preprocess.scan` finds them.
Imports only `errors` and `data.builtin`; never imports preprocess, models, trainer or cli.
"""
from __future__ import annotations

import csv
import json
import mmap
import os
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from flashsae.errors import ConfigError, DataError

SUPPORTED_EXTENSIONS = (".npy", ".npz", ".csv", ".tsv", ".safetensors")
BUILTIN_NAMES = ("digits", "synthetic")

# safetensors dtype names -> little-endian numpy dtypes; BF16 is read as raw uint16 bits.
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "BOOL": "|b1",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "|i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "|u1",
}
_CSV_CHUNK_ROWS = 4096
# What numpy's .npy header parser and zipfile raise on hostile bytes (a tokenizer and literal_eval
# run on the header text; members may be truncated, encrypted or use unknown compression).
_PARSE_ERRORS = (ValueError, OSError, EOFError, SyntaxError, TypeError, KeyError, tokenize.TokenError,
                 RecursionError, OverflowError, struct.error, zlib.error, zipfile.BadZipFile,
                 NotImplementedError, RuntimeError)


class Source:
    """Base class: rows of a (n_rows, d_in) numeric table.

    Attributes:
        name: where the rows come from (a path as given, a built-in name, or "array").
        n_rows: all rows, including any with NaN/Inf.
        d_in: columns per row.
        image_shape: (H, W) when each row is an image, else None.
        ground_truth: planted atoms (atoms, d_in), unit-norm rows, for synthetic data; else None.
        provenance: what produced the rows, as the shard directory's manifest.json records it under
            "provenance" (`flashsae harvest`: model, hook, corpus, ...), plus "path", the directory's
            absolute path; else None.
    """

    name: str
    n_rows: int
    d_in: int
    image_shape: tuple[int, int] | None = None
    ground_truth: np.ndarray | None = None
    provenance: dict | None = None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 C-contiguous (stop - start, d_in); may be a read-only view."""
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at int64 indices `rows` (any order) as a new writable float32 (len(rows), d_in) array."""
        raise NotImplementedError

    storage: str = "float32"
    """How `take_stored` hands rows out: "float32", or "bfloat16" as raw uint16 bits (the top half
    of each float32), which the feed widens on the training device."""

    def take_stored(self, rows: np.ndarray) -> np.ndarray:
        """Like `take`, in the `storage` form: uint16 bits when `storage` is "bfloat16"."""
        return self.take(rows)

    def stored_rows(self) -> np.ndarray | None:
        """Every row in the `storage` form, as the in-memory C-contiguous array that holds them (a
        read-only view, never a copy), or None when the rows are in a file or must be converted."""
        return None

    def take_into(self, rows: np.ndarray, out: np.ndarray, *, stored: bool = False) -> np.ndarray:
        """`take` (or `take_stored` when `stored`) written into `out`, a C-contiguous (len(rows), d_in)
        float32 (or storage-form) array, which is returned. Sources that can read straight into it
        (arrays and memory-mapped files, for ascending `rows`) allocate nothing."""
        out[...] = self.take_stored(rows) if stored else self.take(rows)
        return out

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_rows={self.n_rows}, d_in={self.d_in})"


def _check_rows(rows: np.ndarray, n_rows: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise IndexError(f"row indices must lie in [0, {n_rows}), got [{rows.min()}, {rows.max()}]")
    return rows


def _sorted_gather(rows: np.ndarray, gather_sorted) -> np.ndarray:
    """Call `gather_sorted` on ascending indices (near-sequential file reads), then restore order."""
    if rows.size < 2 or np.all(rows[1:] >= rows[:-1]):
        return gather_sorted(rows)
    order = np.argsort(rows, kind="stable")
    got = gather_sorted(rows[order])
    out = np.empty_like(got)
    out[order] = got
    return out


class ArraySource(Source):
    """Rows of one 2-D array: in memory, or an np.memmap converted to float32 per read.

    Args:
        array: 2-D numeric ndarray or np.memmap.
        name: shown in messages.
        bfloat16: `array` holds raw bfloat16 bits as uint16 (safetensors BF16).
    """

    def __init__(self, array: np.ndarray, name: str, *, bfloat16: bool = False,
                 image_shape=None, ground_truth: np.ndarray | None = None):
        _validate_array(array.shape, array.dtype, name)
        self._array = array
        self._bfloat16 = bfloat16
        self.name = name
        self.n_rows, self.d_in = (int(s) for s in array.shape)
        self.image_shape = _image_shape(image_shape, self.d_in)
        self.ground_truth = ground_truth
        self.storage = "bfloat16" if bfloat16 else "float32"

    def _to_f32(self, a: np.ndarray, copy: bool = False) -> np.ndarray:
        if self._bfloat16:  # bf16 is the top half of a float32
            return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
        if copy:
            return np.array(a, dtype=np.float32, order="C")
        return np.ascontiguousarray(a, dtype=np.float32)

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, self.n_rows)
        return self._to_f32(self._array[start:max(start, stop)])

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = _check_rows(rows, self.n_rows)

        def gather(ids):
            if ids.size and ids[-1] - ids[0] + 1 == ids.size:  # one contiguous run: plain slice
                return self._to_f32(self._array[ids[0]:ids[-1] + 1], copy=True)
            return self._to_f32(self._array[ids])  # fancy indexing already copies

        return _sorted_gather(rows, gather)

    def take_stored(self, rows: np.ndarray) -> np.ndarray:
        if not self._bfloat16:
            return self.take(rows)
        rows = _check_rows(rows, self.n_rows)

        def gather(ids):
            if ids.size and ids[-1] - ids[0] + 1 == ids.size:  # one contiguous run: one slice copy
                return np.array(self._array[ids[0]:ids[-1] + 1])
            return np.asarray(self._array[ids])  # fancy indexing already copies

        return _sorted_gather(rows, gather)

    def take_into(self, rows: np.ndarray, out: np.ndarray, *, stored: bool = False) -> np.ndarray:
        rows = _check_rows(rows, self.n_rows)
        if rows.size > 1 and not np.all(rows[1:] >= rows[:-1]):
            return super().take_into(rows, out, stored=stored)  # sorted by take, then reordered
        a = self._array
        if rows.size and rows[-1] - rows[0] + 1 == rows.size:  # one contiguous run: a slice
            part = a[rows[0]:rows[-1] + 1]
        elif a.dtype == out.dtype:  # ascending ids: near-sequential reads straight into `out`
            return np.take(a, rows, axis=0, out=out, mode="clip")  # "raise" would buffer the copy
        else:
            part = a[rows]
        if self._bfloat16 and not stored:  # bf16 bits are the top half of a float32
            bits = out.view(np.uint32)
            bits[...] = part
            bits <<= 16
        else:
            out[...] = part  # converted to float32 on the way when the file holds another dtype
        return out

    def stored_rows(self) -> np.ndarray | None:
        a = self._array
        dtype = np.uint16 if self._bfloat16 else np.float32
        if a.dtype != dtype or not a.flags.c_contiguous or _is_mapped(a):
            return None
        return _readonly(a)


def _is_mapped(a: np.ndarray) -> bool:
    """Whether `a` views a memory-mapped file (gathering from it at random would read the file at random)."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


class ShardedSource(Source):
    """Shards (each an ArraySource with the same d_in) concatenated along rows, in order."""

    def __init__(self, shards: list[ArraySource], name: str, *, image_shape=None):
        shards = [s for s in shards if s.n_rows]
        if not shards:
            raise DataError(f"{name} has no rows in any shard")
        self._shards = shards
        self._offsets = np.cumsum([0] + [s.n_rows for s in shards]).astype(np.int64)
        self.name = name
        self.n_rows = int(self._offsets[-1])
        self.d_in = shards[0].d_in
        self.image_shape = _image_shape(image_shape, self.d_in)
        kinds = {s.storage for s in shards}
        self.storage = kinds.pop() if len(kinds) == 1 else "float32"

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, self.n_rows)
        parts = []
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self._shards)):
            lo = int(self._offsets[i])
            if lo >= stop:
                break
            parts.append(self._shards[i].read(max(start - lo, 0), stop - lo))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.zeros((0, self.d_in), np.float32)
        return np.concatenate(parts)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self._take(rows, stored=False)

    def take_stored(self, rows: np.ndarray) -> np.ndarray:
        return self._take(rows, stored=self.storage != "float32")

    def take_into(self, rows: np.ndarray, out: np.ndarray, *, stored: bool = False) -> np.ndarray:
        rows = _check_rows(rows, self.n_rows)
        stored = stored and self.storage != "float32"
        if rows.size > 1 and not np.all(rows[1:] >= rows[:-1]):
            return super().take_into(rows, out, stored=stored)
        cuts = np.searchsorted(rows, self._offsets)  # ascending: each shard's rows are one run of `rows`
        for i, s in enumerate(self._shards):
            a, b = int(cuts[i]), int(cuts[i + 1])
            if b > a:
                s.take_into(rows[a:b] - self._offsets[i], out[a:b], stored=stored)
        return out

    def _take(self, rows: np.ndarray, *, stored: bool) -> np.ndarray:
        rows = _check_rows(rows, self.n_rows)

        def gather(ids):
            shard = np.searchsorted(self._offsets, ids, side="right") - 1
            cuts = np.searchsorted(shard, np.arange(len(self._shards) + 1))
            parts = [(s.take_stored if stored else s.take)(ids[a:b] - self._offsets[i])
                     for i, (s, a, b) in enumerate(zip(self._shards, cuts[:-1], cuts[1:])) if b > a]
            if len(parts) == 1:
                return parts[0]
            dtype = np.uint16 if stored else np.float32
            return np.concatenate(parts) if parts else np.zeros((0, self.d_in), dtype)

        return _sorted_gather(rows, gather)


def open_source(data, *, key: str | None = None, image_shape=None,
                synthetic: dict | None = None) -> Source:
    """Open `data` as a Source.

    Args:
        data: a 2-D numpy array or torch tensor (kept in memory as float32); a path to a
            .npy (memory-mapped; a 3-D .npy of images (n, H, W) is read as rows of H * W values,
            with image_shape (H, W) unless given), .npz, .csv, .tsv or .safetensors file or to a directory of
            .npy/.safetensors shards; or a built-in name, "digits" or "synthetic" (a str equal
            to a built-in name means the built-in; pass a Path for a file of that name).
        key: array name inside .npz / tensor name inside .safetensors (and shards); optional
            when the file holds one array (for safetensors, "activations" is used if present).
        image_shape: (H, W) of each row when rows are images; H * W must equal d_in.
        synthetic: overrides of `builtin.SYNTHETIC_DEFAULTS` for data="synthetic".

    Raises:
        DataError: the data is missing, malformed, empty, not 2-D or not numeric.
        ConfigError: an option does not fit the data.
    """
    if isinstance(data, str) and data in BUILTIN_NAMES:
        from flashsae.data import builtin

        _reject_key(key, data)
        if data == "synthetic":
            x, atoms = builtin.make_synthetic(**builtin.synthetic_params(synthetic))
            return ArraySource(_readonly(x), "synthetic", image_shape=image_shape, ground_truth=atoms)
        _reject_synthetic(synthetic, data)
        return ArraySource(builtin.load_digits(), "digits", image_shape=image_shape or (8, 8))
    _reject_synthetic(synthetic, data)
    if isinstance(data, (str, os.PathLike)):
        return _open_path(Path(data).expanduser(), str(data), key, image_shape)
    _reject_key(key, "an in-memory array")
    return ArraySource(_as_float32_array(data), "array", image_shape=image_shape)


def _open_path(path: Path, name: str, key, image_shape) -> Source:
    if path.is_dir():
        return _open_dir(path, name, key, image_shape)
    if not path.exists():
        hint = f" (built-in data sets: {', '.join(BUILTIN_NAMES)})" if path.suffix == "" else ""
        raise DataError(f"{name}: no such file or directory{hint}")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{name}: unsupported file type {ext or '(no extension)'!r}; supported: "
                        f"{', '.join(SUPPORTED_EXTENSIONS)} or a directory of .npy/.safetensors shards")
    if path.stat().st_size == 0:
        raise DataError(f"{name} is empty (0 bytes)")
    if ext == ".npy":
        _reject_key(key, name)
        return _open_npy(path, name, image_shape)
    if ext == ".npz":
        return ArraySource(_load_npz(path, name, key), name, image_shape=image_shape)
    if ext in (".csv", ".tsv"):
        _reject_key(key, name)
        return ArraySource(_read_text(path, name, "," if ext == ".csv" else "\t"), name, image_shape=image_shape)
    array, bf16 = _memmap_safetensors(path, name, key)
    return ArraySource(array, name, bfloat16=bf16, image_shape=image_shape)


def _open_dir(path: Path, name: str, key, image_shape) -> Source:
    info = _read_manifest(path / "manifest.json")
    if isinstance(info.get("shards"), list):  # e.g. `flashsae harvest`: exactly the complete shards, in order
        files = [_listed_shard(path, s) for s in info["shards"]]
        for f in files:
            if not f.is_file():
                raise DataError(f"{f} is listed in {path / 'manifest.json'} but missing")
    else:
        listed = info.get("aux_files")
        aux = {a for a in listed if isinstance(a, str)} if isinstance(listed, list) else set()
        files = sorted((p for p in path.iterdir() if p.suffix in (".npy", ".safetensors") and p.is_file()
                        and p.name not in aux and not p.name.startswith("tokens")), key=lambda p: p.name)
    if not files:
        raise DataError(f"{name} is a directory with no .npy or .safetensors shards")
    shards = []
    for f in files:
        shard_name = str(Path(name) / f.name)
        if f.stat().st_size == 0:
            raise DataError(f"{shard_name} is empty (0 bytes)")
        if f.suffix == ".npy":
            shards.append(ArraySource(_memmap_npy(f, shard_name), shard_name))
        else:
            array, bf16 = _memmap_safetensors(f, shard_name, key)
            shards.append(ArraySource(array, shard_name, bfloat16=bf16))
        if shards[-1].d_in != shards[0].d_in:
            raise DataError(f"{shard_name} has {shards[-1].d_in} columns but {shards[0].name} "
                            f"has {shards[0].d_in}; all shards must have the same width")
    if image_shape is None:
        image_shape = info.get("image_shape")
    source = ShardedSource(shards, name, image_shape=image_shape)
    if isinstance(info.get("provenance"), dict):
        source.provenance = {**info["provenance"], "path": str(path.resolve())}
    return source


def _listed_shard(path: Path, entry) -> Path:
    """A shard named in manifest.json: a file name (or {"file": name}) inside the directory itself."""
    name = entry.get("file") if isinstance(entry, dict) else entry
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(f"{path / 'manifest.json'} lists a shard {str(entry)[:80]!r} that is not a file name "
                        "inside the directory")
    return path / name


def _read_manifest(manifest: Path) -> dict:
    """A shard directory's optional manifest.json ({} when absent)."""
    if not manifest.is_file():
        return {}
    try:
        info = json.loads(manifest.read_text())
    except (ValueError, RecursionError) as e:
        raise DataError(f"{manifest} is not a valid JSON object ({e})") from None
    if not isinstance(info, dict):
        raise DataError(f"{manifest} is not a valid JSON object")
    return info


def _validate_array(shape: tuple, dtype: np.dtype, name: str) -> None:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        kind = "complex" if dtype.kind == "c" else "non-numeric"
        raise DataError(f"{name} holds {kind} data of dtype {dtype}; expected real integers or floats")
    if len(shape) != 2:
        raise DataError(f"{name} has shape {tuple(shape)}; expected 2-D data (rows, features)")
    if shape[0] == 0:
        raise DataError(f"{name} has no rows (shape {tuple(shape)})")
    if shape[1] == 0:
        raise DataError(f"{name} has 0 columns (shape {tuple(shape)})")


def _image_shape(image_shape, d_in: int) -> tuple[int, int] | None:
    if image_shape is None:
        return None
    try:
        h, w = (int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"image_shape must be two integers (H, W), got {image_shape!r}") from None
    if h < 1 or w < 1 or h * w != d_in:
        raise ConfigError(f"image_shape ({h}, {w}) does not fit rows of {d_in} values; H * W must equal d_in")
    return (h, w)


def _reject_key(key, what: str) -> None:
    if key is not None:
        raise ConfigError(f"key={key!r} was given but {what} has no named arrays; "
                          "key applies to .npz, .safetensors and shard directories only")


def _reject_synthetic(synthetic, data) -> None:
    if synthetic:
        raise ConfigError(f"synthetic options apply only to data='synthetic', not {data!r}")


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False  # read() hands out views: callers must not edit the source
    return a


def _as_float32_array(data) -> np.ndarray:
    if type(data).__module__.startswith("torch"):
        import torch

        if isinstance(data, torch.Tensor):
            data = data.detach().to("cpu")
            data = (data.float() if data.is_floating_point() else data).numpy()
    try:
        a = np.asarray(data)
    except (TypeError, ValueError) as e:
        raise DataError(f"array: cannot convert {type(data).__name__} to a numeric array ({e})") from None
    _validate_array(a.shape, a.dtype, "array")
    return _readonly(np.ascontiguousarray(a, dtype=np.float32))


def _open_npy(path: Path, name: str, image_shape) -> ArraySource:
    """A .npy file of rows (n, d), or of images (n, H, W) read as rows of H * W values, memory-mapped."""
    shape, fortran_order, dtype = _npy_header(path, name)
    if len(shape) != 3:
        if len(shape) > 3:
            raise DataError(f"{name} has shape {tuple(shape)}; expected 2-D data (rows, features) "
                            "or 3-D images (n, H, W)")
        return ArraySource(_memmap_npy(path, name), name, image_shape=image_shape)
    n, h, w = shape
    _validate_array((n, h * w), dtype, name)
    if fortran_order and n > 1:  # its rows are not contiguous: a reshape would copy the whole file
        raise DataError(f"{name} holds images (n, H, W) in Fortran order; save it in C order "
                        "(np.save(path, np.ascontiguousarray(images))) to read it as rows")
    images = _load_npy(path, name)
    return ArraySource(images.reshape(n, h * w), name, image_shape=image_shape or (h, w))


def _npy_header(path: Path, name: str) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) from a .npy file's header."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            return read_header(f)
    except _PARSE_ERRORS as e:
        raise DataError(f"{name} is not a valid .npy file ({e})") from None


def _memmap_npy(path: Path, name: str) -> np.ndarray:
    shape, _, dtype = _npy_header(path, name)
    _validate_array(shape, dtype, name)
    return _load_npy(path, name)


def _load_npy(path: Path, name: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except _PARSE_ERRORS as e:
        raise DataError(f"{name} is truncated or not a valid .npy file ({e})") from None


def _load_npz(path: Path, name: str, key) -> np.ndarray:
    with open(path, "rb") as f:
        if not f.read(4).startswith(b"PK"):
            raise DataError(f"{name} is not a valid .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            key = _choose_key(list(archive.files), key, name, "array")
            a = archive[key]
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e):  # object arrays need pickle, which is never enabled
            raise DataError(f"{name}: array {key!r} holds non-numeric data ({e})") from None
        raise DataError(f"{name} is not a valid .npz file ({e})") from None
    except MemoryError:
        raise DataError(f"{name}: array {key!r} does not fit in memory; save it as .npy to memory-map it") from None
    except _PARSE_ERRORS as e:
        raise DataError(f"{name} is not a valid .npz file ({type(e).__name__}: {e})") from None
    _validate_array(a.shape, a.dtype, f"{name}[{key!r}]")
    return _readonly(np.ascontiguousarray(a, dtype=np.float32))


def _choose_key(keys: list[str], key, name: str, what: str) -> str:
    if key is not None:
        if key not in keys:
            raise DataError(f"{name} has no {what} named {key!r}; available: {', '.join(keys) or '(none)'}")
        return key
    if len(keys) == 1:
        return keys[0]
    if what == "tensor" and "activations" in keys:
        return "activations"
    if not keys:
        raise DataError(f"{name} holds no {what}s")
    raise DataError(f"{name} holds several {what}s ({', '.join(keys)}); choose one with key")


def _memmap_safetensors(path: Path, name: str, key) -> tuple[np.ndarray, bool]:
    """Memory-map one tensor of a safetensors file (8-byte header length, JSON header, raw data)."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        keys = sorted(header)
    except (ValueError, struct.error, AttributeError, RecursionError) as e:
        raise DataError(f"{name} is not a valid .safetensors file ({e})") from None
    key = _choose_key(keys, key, name, "tensor")
    info = header[key]
    label = f"{name}[{key!r}]"
    try:
        dtype_name = info["dtype"]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise DataError(f"{label} has a malformed safetensors header entry ({str(info)[:100]})") from None
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise DataError(f"{name}: tensor {key!r} has unsupported dtype {dtype_name}; "
                        f"supported: {', '.join(_SAFETENSORS_DTYPES)}")
    _validate_array(shape, dtype, label)
    if min(shape) < 0 or not 0 <= begin <= end:
        raise DataError(f"{label} has a malformed safetensors header entry ({str(info)[:100]})")
    offset = 8 + header_len + begin
    if end - begin != shape[0] * shape[1] * np.dtype(dtype).itemsize or offset + end - begin > path.stat().st_size:
        raise DataError(f"{label} is truncated or its header does not match its data")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape), info["dtype"] == "BF16"


def _read_text(path: Path, name: str, delimiter: str) -> np.ndarray:
    """Parse a delimited numeric table; a first row with any non-numeric cell is the header."""
    header: list[str] | None = None
    width = None
    rows: list[list[float]] = []
    chunks: list[np.ndarray] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            for cells in reader:
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    continue  # blank line
                if width is None:
                    width = len(cells)
                    if not all(_is_number(c) for c in cells):
                        header = [c.strip() for c in cells]
                        continue
                if len(cells) != width:
                    raise DataError(f"{name}, line {reader.line_num}: found {len(cells)} cells, "
                                    f"expected {width} like the first row")
                try:
                    rows.append([float(c) for c in cells])
                except ValueError:
                    raise _cell_error(name, reader.line_num, cells, header) from None
                if len(rows) == _CSV_CHUNK_ROWS:
                    chunks.append(np.array(rows, dtype=np.float32))
                    rows = []
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DataError(f"{name} could not be parsed as delimited text ({e})") from None
    if rows:
        chunks.append(np.array(rows, dtype=np.float32))
    if not chunks:
        raise DataError(f"{name} has no rows (no numeric data below the header)")
    return _readonly(np.concatenate(chunks) if len(chunks) > 1 else chunks[0])


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _cell_error(name: str, line: int, cells: list[str], header) -> DataError:
    j = next(j for j, c in enumerate(cells) if not _is_number(c))
    column = f"column {header[j]!r}" if header and header[j] else f"column {j + 1}"
    if not cells[j].strip():
        return DataError(f"{name}, line {line}, {column}: empty cell where a number was expected")
    return DataError(f"{name}, line {line}, {column}: cannot read {cells[j]!r} as a number")
