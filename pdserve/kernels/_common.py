"""Small helpers the kernel wrappers share: backend detection and argument checks."""

from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set by the tests without a
    GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device`; a small stand-in under the interpreter so grids stay tiny."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_rows(name: str, t: torch.Tensor, ndim: int) -> None:
    """Kernels index with explicit strides everywhere but the last dim, which must be unit-stride."""
    check(t.dim() == ndim, f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    check(t.stride(-1) == 1 or t.shape[-1] == 1, f"{name}: last dim must be contiguous, strides {t.stride()}")


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.dtype in (torch.float32, torch.float16, torch.bfloat16), f"{name}: unsupported dtype {t.dtype}")


def check_same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    check(len(devices) == 1, f"tensors on different devices: {sorted(map(str, devices))}")
