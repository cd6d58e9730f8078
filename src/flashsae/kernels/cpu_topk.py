"""Row-wise top-k on the CPU, compiled from `cpu_topk.c` on first use.

`torch.topk` on the CPU copies every row into (value, index) pairs and partially sorts them: at
the shapes SAEs train with it costs more than the encoder product (18 ms for 4096 x 4096, k=16,
on two cores). `cpu_topk.c` reads each row once for the maxima of small groups of entries, takes
the k-th largest of those as a lower bound, and selects among the few entries above it: 5-15x
faster than torch.topk at SAE shapes (`python -m bench.topk_cpu`), with the same set of values
(`sorted=False` order, NaN ranked highest like torch.topk).

The shared library is built with the system C compiler (`$CC`, `cc` or `gcc`; `-O3 -march=native`,
plus `$FLASHSAE_CPU_TOPK_CFLAGS`) into a cache directory keyed by the source, the compiler and the
CPU (`$FLASHSAE_CACHE`, else `$XDG_CACHE_HOME/flashsae`, else `~/.cache/flashsae`), written under a
temporary name and renamed. Without a compiler, or when the build fails, `topk` quietly uses
`torch.topk`; `FLASHSAE_KERNELS=reference` does too. `build()` says which one runs: the AVX-512
build, the portable one (no AVX-512 on the CPU or in the flags), or None for torch.topk.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("cpu_topk.c")
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-std=c11")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_K_FRACTION = 8
"""Use the kernel for k <= n / MAX_K_FRACTION (and k <= MAX_K): its groups need a few entries per
selected one (measured up to n / 8: 6x torch.topk there); beyond that torch.topk runs."""
MAX_K = 1024


def cache_dir() -> Path:
    root = os.environ.get("FLASHSAE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "flashsae")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (the build uses -march=native)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features") and key not in found:
                    found[key] = line.strip()
    except OSError:
        pass
    return "\n".join(found.values()) or platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


class _Compiled(NamedTuple):
    topk: Callable[..., int]  # flashsae_topk
    build: str  # "avx512" or "portable"


@functools.cache
def _library() -> _Compiled | None:
    """The compiled library, or None when it cannot be built or loaded here."""
    cc = _compiler()
    if cc is None or not _SOURCE.exists():
        return None
    source = _SOURCE.read_bytes()
    flags = [*_FLAGS, *os.environ.get("FLASHSAE_CPU_TOPK_CFLAGS", "").split()]
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_signature().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"cpu_topk-{key}.so"
    try:
        if not target.exists():
            from flashsae import io

            target.parent.mkdir(parents=True, exist_ok=True)
            # concurrent builds each rename a whole library; 0777 less the umask, as the compiler writes it
            with io.atomic_path(target, suffix=".so", mode=0o777) as tmp:
                subprocess.run([cc, *flags, str(_SOURCE), "-o", str(tmp), "-lm"], check=True, capture_output=True,
                               timeout=120)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = lib.flashsae_topk
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.flashsae_topk_avx512.restype = ctypes.c_int
    lib.flashsae_topk_avx512.argtypes = []
    return _Compiled(fn, "avx512" if lib.flashsae_topk_avx512() else "portable")


def _compiled() -> _Compiled | None:
    """The compiled library, or None when it is unavailable or FLASHSAE_KERNELS=reference."""
    from flashsae.kernels import selection

    return None if selection.setting() == "reference" else _library()


def _kernel():
    """The compiled function, or None when torch.topk runs."""
    compiled = _compiled()
    return None if compiled is None else compiled.topk


def build() -> str | None:
    """Which compiled kernel `topk` runs here: "avx512", "portable", or None for torch.topk.

    None without a compiler, when the build fails, or with FLASHSAE_KERNELS=reference.

    Raises:
        ConfigError: FLASHSAE_KERNELS has an unknown value, or is `triton` without triton installed.
    """
    compiled = _compiled()
    return None if compiled is None else compiled.build


def available() -> bool:
    """Whether `topk` runs the compiled kernel here (else it is torch.topk)."""
    return build() is not None


def topk(x: Tensor, k: int, *, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of each row of a 2-D tensor, unsorted.

    The compiled kernel runs for CPU float32/bfloat16 tensors with unit column stride and
    k <= min(n / 8, 1024); anything else goes to `x.topk(k, dim=-1, sorted=False)`. Values are
    differentiable (a gather at the selected indices) when `x` requires grad. `out`: (values,
    indices) tensors of shape (rows, k) to write into (not with a differentiable `x`).
    """
    rows, n = x.shape
    fits = (x.device.type == "cpu" and x.dtype in _DTYPES and x.stride(1) == 1 and rows > 0
            and 1 <= k <= min(n // MAX_K_FRACTION, MAX_K))
    fn = _kernel() if fits else None
    if fn is None:
        if out is not None:
            return torch.topk(x, k, dim=-1, sorted=False, out=out)
        return x.topk(k, dim=-1, sorted=False)
    if x.requires_grad:
        indices = topk(x.detach(), k)[1]
        return x.gather(1, indices), indices
    values, indices = out if out is not None else (torch.empty((rows, k), dtype=x.dtype),
                                                    torch.empty((rows, k), dtype=torch.int64))
    if not (values.is_contiguous() and indices.is_contiguous()) or values.dtype != x.dtype:
        v, i = topk(x, k)
        values.copy_(v)
        indices.copy_(i)
        return values, indices
    threads = torch.get_num_threads() if rows * n >= 1 << 16 else 1
    status = fn(x.data_ptr(), rows, n, x.stride(0), k, _DTYPES[x.dtype], values.data_ptr(), indices.data_ptr(),
                threads)
    if status:  # out of memory for a heap: the slow path still gives the answer
        return torch.topk(x, k, dim=-1, sorted=False, out=(values, indices))
    return values, indices
