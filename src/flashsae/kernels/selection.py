"""Which kernels run: `FLASHSAE_KERNELS`, parsed here and nowhere else.

Accepted values (case and surrounding spaces ignored): unset, empty or `auto` (Triton for CUDA
tensors when triton imports, the reference elsewhere, the compiled CPU top-k on the CPU when it
builds); `reference` (plain PyTorch everywhere, `torch.topk` included: the specification);
`triton` (Triton wherever it can run: CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`).
Anything else, or `triton` where triton is not installed, is a ConfigError rather than a quiet
fall-back. Imports only errors.
"""
from __future__ import annotations

import functools
import os

from flashsae.errors import ConfigError

SETTINGS = ("auto", "reference", "triton")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def setting() -> str:
    """The FLASHSAE_KERNELS setting: auto, reference or triton.

    Raises:
        ConfigError: an unknown value, or `triton` without triton installed.
    """
    raw = os.environ.get("FLASHSAE_KERNELS", "")
    value = raw.strip().lower() or "auto"
    if value not in SETTINGS:
        raise ConfigError(f"FLASHSAE_KERNELS={raw!r} is not one of {', '.join(SETTINGS)} (or unset)")
    if value == "triton" and not triton_importable():
        raise ConfigError("FLASHSAE_KERNELS=triton but triton is not installed; pip install triton, "
                          "or unset FLASHSAE_KERNELS")
    return value


def impl(device) -> str:
    """The implementation of the sparse kernels for tensors on `device`: triton or reference."""
    choice = setting()
    if choice == "reference":
        return "reference"
    on_cuda = getattr(device, "type", str(device)) == "cuda"
    runnable = on_cuda or (choice == "triton" and os.environ.get("TRITON_INTERPRET", "") == "1")
    return "triton" if runnable and triton_importable() else "reference"


def native_bf16(device) -> bool:
    """Whether `device` has bf16 matrix units: AVX512-BF16 / AMX on a CPU, compute capability 8.0+ on CUDA."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and _cpu_has_bf16()


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False
