"""Where and how the process runs: devices, the allocator, signals."""

from __future__ import annotations

import ctypes
import signal
import sys

import torch

from .errors import JobError

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_allocations() -> bool:
    """Stop glibc from mmap-ing and unmapping every large tensor.

    A CNN's activations at 224 px exceed glibc's 32 MiB mmap ceiling, so by default each forward pass maps
    them fresh and the kernel zero-fills every page again: measured here, half the CPU time went to the
    system and EfficientNet-Lite0 ran 2.5x slower. Keeping them on the heap (and not trimming it) fixes
    that at the cost of holding peak memory. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def exit_cleanly_on_sigterm() -> None:
    """Batch schedulers stop jobs with SIGTERM: turn it into SystemExit so that `finally` blocks remove
    half-made outputs, as they do for Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def resolve_devices(device: str, decoder: str) -> tuple[torch.device, str]:
    """The torch device and DALI decoder for `runtime.device` / `runtime.decoder` ("auto": CUDA when present)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise JobError("runtime.device = 'cuda' but CUDA is not available on this machine")
    chosen = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if decoder == "auto":
        decoder = "mixed" if chosen.type == "cuda" else "cpu"
    if decoder == "mixed" and chosen.type != "cuda":
        raise JobError("runtime.decoder = 'mixed' needs CUDA")
    return chosen, decoder
