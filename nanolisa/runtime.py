"""Where and how a process computes: the device, mixed precision, CPU threads and the C allocator.

Shared by training and inference (train.py, chat.py, eval.py take the same --device, --dtype and --threads).
The multi-process set-up (rank, world size, process group) belongs here too.
"""
from __future__ import annotations

import ctypes
from contextlib import nullcontext
from typing import ContextManager

import torch

from nanolisa.errors import UserError


def pick_device(device: str | None) -> torch.device:
    """--device: a torch device string; by default cuda if available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device; use cpu, cuda, cuda:1, mps, ...") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return d


def default_dtype(device: torch.device) -> str:
    """bf16 on a GPU that supports it, else fp32."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """Mixed precision for the forward pass: matmuls in dtype, weights stay as they are (fp32 masters).
    dtype None or fp32: no autocast."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_threads(threads: int | None) -> None:
    """Apply --threads (None: leave torch's choice)."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: must be >= 1")
        torch.set_num_threads(threads)


def return_freed_memory_to_os() -> None:
    """Ask glibc to serve allocations of 1 MiB and more with mmap, so memory freed at a LISA switch goes
    back to the OS.

    With glibc's default (adaptive) threshold, the 2-16 MB gradient and Adam-state tensors come from the
    heap, and freeing them at every switch fragments it: resident memory crept up 24% over 11 switches on
    the bench's 85M model. With a fixed threshold it stayed within 3.4% (bench/RESULTS.md). 128 KiB also
    worked but slowed the tiny model 2.3x (many small activations churned through mmap); 1 MiB does not.
    On CUDA this does not matter (tensors live in torch's caching allocator); without glibc it is a no-op."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1024 * 1024)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
