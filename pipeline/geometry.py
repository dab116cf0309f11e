"""The training views (grid shuffle, RandomResizedCrop, flip) on torch tensors, and the one decoder of
distilled images; the geometry itself (cells, tiers, view parameters) is rded.grid, torch-free.

Imports only torch, numpy and Pillow, so that a user's training process (rded.loader) stays light.
"""

from __future__ import annotations

import io
import platform
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .grid import VIEW_RATIO, View, cell_boxes, draw_view, stored_view, tier_layout  # noqa: F401 (one place)
from .keyed import Window

def shuffle_grid(image: torch.Tensor, col_perm: tuple[int, ...], row_perm: tuple[int, ...]) -> torch.Tensor:
    """Permute the grid's column strips, then its row strips (cells keep their own sizes)."""
    # the image is square, so one set of strip bounds serves columns and rows
    bounds = [(b[0], b[2]) for b in cell_boxes(image.shape[-1], len(col_perm))[:len(col_perm)]]
    image = torch.cat([image[..., :, bounds[c][0]:bounds[c][1]] for c in col_perm], dim=-1)
    return torch.cat([image[..., bounds[r][0]:bounds[r][1], :] for r in row_perm], dim=-2)


def _native_uint8_resize() -> bool:
    # torchvision resizes uint8 natively on these CPUs and through float32 elsewhere; follow it exactly
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resized_crop(image: torch.Tensor, window: Window, size: int) -> torch.Tensor:
    """torchvision's `resized_crop(..., antialias=True)` (bilinear) for a uint8 CHW tensor and an in-bounds
    window, written with torch alone so that the loader does not import torchvision; a test checks that
    the two agree pixel for pixel."""
    x, y, w, h = window
    out = image[..., y:y + h, x:x + w]
    if (h, w) == (size, size):
        return out
    channels = out.shape[-3]
    batch = out.reshape(-1, channels, h, w)
    native = image.device.type == "cpu" and _native_uint8_resize()
    if batch.is_contiguous(memory_format=torch.channels_last) and batch.shape[0] == 1 and batch.numel() != batch.stride(0):
        batch = batch.as_strided((1, channels, h, w), (batch.numel(), *batch.stride()[1:]))  # as torchvision
    if native:
        resized = F.interpolate(batch, size=[size, size], mode="bilinear", align_corners=False, antialias=True)
    else:
        resized = F.interpolate(batch.float(), size=[size, size], mode="bilinear", align_corners=False,
                                antialias=True).round_().to(image.dtype)
    return resized.reshape(out.shape[:-3] + (channels, size, size))


def apply_view(image: torch.Tensor, view: View, resolution: int) -> torch.Tensor:
    """The training view of a distilled image: uint8 CHW in, uint8 CHW (S x S) out."""
    out = resized_crop(shuffle_grid(image, view.col_perm, view.row_perm), view.crop, resolution)
    return out.flip(-1) if view.flip else out


def decode_distilled(encoded: bytes) -> torch.Tensor:
    """uint8 CHW RGB: one decoder for the relabel stage and the loader, so labels match training input."""
    with Image.open(io.BytesIO(encoded)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
