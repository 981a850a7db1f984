"""The few CUDA driver calls qvlq makes beside PyTorch, through ctypes on libcuda (which every CUDA driver
installs): int4_mma loads and launches its kernels, and stream pins host memory of an exact size.

Why the driver API rather than torch.cuda.cudart(): a failed runtime call leaves its error as the thread's
"last error", which PyTorch's next kernel-launch check would report as that kernel's failure. A driver call
returns its error and leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import functools

import torch


@functools.cache
def libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def check(rc: int, what: str) -> None:
    """Raise with the driver's message if rc is not CUDA_SUCCESS."""
    if rc != 0:
        msg = ctypes.c_char_p()
        libcuda().cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"CUDA driver {what}: error {rc} {msg.value.decode() if msg.value else ''}".strip())


def current_context(device_index: int) -> ctypes.c_void_p:
    """PyTorch's context of the device, made current on this thread (call inside torch.cuda.device(index))."""
    cu = libcuda()
    ctx = ctypes.c_void_p()
    check(cu.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:  # no CUDA work on this thread yet: an allocation makes PyTorch's context current
        torch.empty(1, device=f"cuda:{device_index}")
        check(cu.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        raise RuntimeError(f"no current CUDA context on this thread for cuda:{device_index}")
    return ctx
