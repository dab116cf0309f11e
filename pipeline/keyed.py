"""Keyed randomness and crop geometry: every random choice of the job is a pure function of
(seed, key, index), never of a global RNG, batch size, worker count or file order."""

from __future__ import annotations

import hashlib
import math
import struct

Window = tuple[int, int, int, int]  # x, y, w, h in source pixels

MIN_AREA, MAX_AREA = 0.08, 1.0  # the candidate crops' area fraction (RDED, DESIGN.md §1)


def keyed_u64(seed: int, *parts: object) -> int:
    """A 64-bit integer that is a pure function of (seed, parts): the root of all our randomness."""
    text = "\x1f".join([str(seed), *map(str, parts)])
    return struct.unpack("<Q", hashlib.blake2b(text.encode(), digest_size=8).digest())[0]


def keyed_uniform(seed: int, *parts: object) -> float:
    """Uniform in [0, 1), 53 bits, from (seed, parts)."""
    return (keyed_u64(seed, *parts) >> 11) / float(1 << 53)


def keyed_permutation(n: int, seed: int, *parts: object) -> tuple[int, ...]:
    return tuple(sorted(range(n), key=lambda i: keyed_u64(seed, *parts, i)))


def random_resized_crop(seed: int, parts: tuple, width: int, height: int, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> Window:
    """torchvision's RandomResizedCrop.get_params, drawn from keyed uniforms of (seed, *parts) instead
    of a global RNG: the same 10 tries (area uniform in scale, log-ratio uniform in ratio) and the same
    centre-crop fallback."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(10):
        u_area, u_ratio, u_x, u_y = (keyed_uniform(seed, *parts, attempt, what) for what in "arxy")
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio) if ratio[0] != ratio[1] else ratio[0]
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (int(u_x * (width - w + 1)), int(u_y * (height - h + 1)), w, h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return ((width - w) // 2, (height - h) // 2, w, h)


def crop_window(seed: int, key: str, crop_index: int, width: int, height: int) -> Window:
    """Candidate patch `crop_index` of an image: a square RandomResizedCrop with area 8-100 %."""
    return random_resized_crop(seed, ("crop", key, crop_index), width, height, (MIN_AREA, MAX_AREA), (1.0, 1.0))


def centre_square(seed: int, key: str, crop_index: int, width: int, height: int) -> Window:
    """The largest centred square: a whole real image, for the random-subset baseline."""
    side = min(width, height)
    return ((width - side) // 2, (height - side) // 2, side, side)
