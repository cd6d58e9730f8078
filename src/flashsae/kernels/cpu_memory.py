"""Keep freed memory in the process on the CPU, so a training step's temporaries cost no page faults.

glibc's malloc hands blocks above its mmap threshold (128 KiB, rising to at most 32 MiB as large
blocks are freed) straight back to the kernel, so every (batch, d) temporary of every step is
mapped afresh and faulted in page by page. On a 2-core VM that made an elementwise product of two
4096 x 256 fp32 tensors take 0.77 ms instead of 0.21 ms. `keep_freed_memory()` raises the mmap and
trim thresholds (`mallopt`) once per process, which the training entry points call when they train
on the CPU: the process then keeps its peak heap instead of returning it between steps.

Only with glibc; elsewhere, or with FLASHSAE_MALLOPT=0, it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds to 1 GiB (once); True when it took effect."""
    if os.environ.get("FLASHSAE_MALLOPT", "").strip() == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
