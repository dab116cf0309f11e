"""Where and how the process runs: devices, the precision and layout of every model call, the allocator,
signals."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

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


_NO_GPU_VALUES = ("", "void", "none")


def gpus_seen(environ: Mapping[str, str] | None = None, dev: str | Path = "/dev") -> list[str]:
    """What says that this machine (or container) was given NVIDIA GPUs: NVIDIA_VISIBLE_DEVICES set to
    something other than empty, `void` or `none` (the container toolkit and the Kubernetes device plugin
    set it), and /dev/nvidia0, /dev/nvidia1, ... device files. Empty where there is no sign of a GPU."""
    environ = os.environ if environ is None else environ
    seen = []
    visible = environ.get("NVIDIA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() not in _NO_GPU_VALUES:
        seen.append(f"NVIDIA_VISIBLE_DEVICES={visible}")
    try:
        files = sorted(p for p in Path(dev).iterdir() if re.fullmatch(r"nvidia\d+", p.name))
    except OSError:
        files = []
    seen.extend(str(p) for p in files)
    return seen


def cuda_unusable_reason(driver_version_file: str | Path = "/proc/driver/nvidia/version") -> str:
    """Why torch cannot use CUDA here, as far as torch (and the kernel driver) can tell: a CPU-only torch,
    or the error of CUDA's initialisation (no driver, a driver too old for torch's CUDA), with the
    driver's version when it is loaded."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    parts = []
    try:
        torch.cuda.init()
    except Exception as e:  # torch raises RuntimeError or AssertionError, worded by the driver's state
        first = str(e).strip().split(". ")[0].rstrip(".")
        parts.append(f"CUDA did not initialise: {first}" if first else f"CUDA did not initialise ({type(e).__name__})")
    else:
        parts.append("torch.cuda.is_available() is false")
    try:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", Path(driver_version_file).read_text())
        if m:
            parts.append(f"the NVIDIA driver loaded is {m.group(1)}")
    except OSError:
        pass
    parts.append(f"this torch is built for CUDA {torch.version.cuda} and needs a driver that supports it")
    return "; ".join(parts)


def resolve_devices(device: str, decoder: str, *, environ: Mapping[str, str] | None = None,
                    dev: str | Path = "/dev") -> tuple[torch.device, str]:
    """The torch device and DALI decoder for `runtime.device` / `runtime.decoder` ("auto": CUDA when present).

    "auto" falls back to the CPU only where no GPU is in sight: a machine that was given GPUs (gpus_seen:
    NVIDIA_VISIBLE_DEVICES, /dev/nvidiaN; `environ` and `dev` are those to look at) but where torch cannot
    use CUDA (a driver too old for the CUDA 13 wheels, a missing driver in the container) is a JobError
    naming what was seen and why, rather than a whole job run on the CPU while it holds the GPUs. Ask for
    the CPU (`runtime.device = "cpu"`) to run there anyway."""
    if device == "cuda" and not torch.cuda.is_available():
        raise JobError(f"runtime.device = 'cuda' but CUDA is not usable on this machine: {cuda_unusable_reason()}")
    if device == "auto" and not torch.cuda.is_available():
        seen = gpus_seen(environ, dev)
        if seen:
            raise JobError(
                f"runtime.device = 'auto': this machine was given GPUs ({', '.join(seen)}) but CUDA is not usable: "
                f"{cuda_unusable_reason()}. Fix the driver or the container's GPU set-up, or set runtime.device = "
                f"\"cpu\" (--set runtime.device=cpu; --device cpu for rded eval and train-observer) to run on the CPU")
    chosen = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if decoder == "auto":
        decoder = "mixed" if chosen.type == "cuda" else "cpu"
    if decoder == "mixed" and chosen.type != "cuda":
        raise JobError("runtime.decoder = 'mixed' needs CUDA")
    return chosen, decoder


Precision = Literal["fp32", "bf16"]


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes in bf16 itself rather than emulating it: CUDA devices that support it,
    x86 CPUs with AVX-512 BF16 or AMX. (oneDNN also runs bf16 on plain AVX-512, emulated and slower.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                     "_is_amx_tile_supported"))
    return False


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """`runtime.precision`: "auto" is bf16 where the hardware has native bf16 and fp32 elsewhere."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested not in ("fp32", "bf16"):
        raise JobError(f"runtime.precision: expected auto, fp32 or bf16; got {requested!r}")
    return requested  # type: ignore[return-value]


def refinement_precision(requested: str, device: torch.device) -> Precision:
    """Refinement back-propagates to the image, where bf16 loses on the CPU: measured on Zen 4, EfficientNet-
    Lite0 at 112 px, 6.35 s per image in bf16 against 5.22 in fp32 (docs/performance.md). So `auto` keeps
    fp32 for it on the CPU; an explicit precision, and CUDA, are taken as they are."""
    if requested == "auto" and device.type == "cpu":
        return "fp32"
    return resolve_precision(requested, device)


@dataclass(frozen=True)
class ComputePolicy:
    """How every model call runs: the device, bf16 autocast or fp32, and the memory layout.

    Channels-last is on for both precisions: measured on the CPU (oneDNN) it is 1.2-1.4x faster in fp32
    and needed for the bf16 gain; on CUDA it is what tensor cores want. bf16 runs as torch's autocast:
    weights stay fp32, convolutions and matmuls run in bf16 with fp32 accumulation, reductions and
    softmax in fp32, and what leaves a model call is cast back to fp32.
    """

    device: torch.device
    precision: Precision = "fp32"
    channels_last: bool = True

    @classmethod
    def resolve(cls, device: torch.device | str, precision: str = "auto", channels_last: bool = True) -> ComputePolicy:
        device = torch.device(device)
        return cls(device, resolve_precision(precision, device), channels_last)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model on the device, in the policy's layout (weights stay fp32)."""
        model = model.to(self.device)
        return model.to(memory_format=self.memory_format) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """An NCHW batch in the policy's layout (a no-op for other shapes)."""
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 and self.channels_last else x

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One model call under the policy; the output in fp32."""
        with self.autocast():
            return model(self.input(x)).float()

    def record(self) -> dict[str, str]:
        """What ran, for manifests and reports."""
        return {"device": self.device.type, "precision": self.precision,
                "memory_format": "channels_last" if self.channels_last else "contiguous"}
