"""Where and how a process computes: the device, mixed precision, CPU threads and the C allocator.

Shared by training and inference (train.py, chat.py, eval.py take the same --device, --dtype and --threads).
The multi-process set-up (rank, world size, process group, FSDP2 and DDP) is nanolisa/parallel.py's.
"""
from __future__ import annotations

import ctypes
import os
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
    if d.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: nanolisa computes on cpu, cuda or mps, not {d.type}")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS (Apple's GPU) is not available on this machine; use --device cpu")
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


def check_threads(threads: int) -> None:
    """--threads between 1 and the machine's CPU count (torch crashed with a segmentation fault at 100000)."""
    cpus = os.cpu_count() or 1
    if not 1 <= threads <= cpus:
        raise UserError(f"--threads must be between 1 and {cpus} (this machine's CPUs), got {threads}")


def set_threads(threads: int | None) -> None:
    """Apply --threads (None: leave torch's choice)."""
    if threads is not None:
        check_threads(threads)
        torch.set_num_threads(threads)


def available_memory(device: torch.device | None = None) -> int:
    """Bytes this process can still allocate on `device`: what the CUDA device has free; elsewhere the
    kernel's MemAvailable, or the container's memory limit less what it uses (cgroup v2 or v1), whichever is
    less. Used to refuse, in one line, work that cannot fit (a 20 GB data file, a config.json of a million
    layers) instead of dying of it minutes later."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = []
    try:
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        free.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as a, open(used) as b:
                free.append(int(a.read()) - int(b.read()))
        except (OSError, ValueError):  # no such cgroup, or no limit ("max")
            continue
    return max(0, min(free))


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def return_freed_memory_to_os() -> None:
    """Ask glibc to serve allocations of 1 MiB and more with mmap, so memory freed at a LISA switch goes
    back to the OS.

    With glibc's default (adaptive) threshold, the 2-16 MB gradient and Adam-state tensors come from the
    heap, and freeing them at every switch fragments it: resident memory crept up 24% over 11 switches on
    the bench's 85M model. With a fixed threshold it stayed within 3.4% (bench/HISTORY.md). 128 KiB also
    worked but slowed the tiny model 2.3x (many small activations churned through mmap); 1 MiB does not.
    On CUDA this does not matter (tensors live in torch's caching allocator); without glibc it is a no-op."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1024 * 1024)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
