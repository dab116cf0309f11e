"""Select: the seeded uniform subset of `subset` samples per class, independent of input order.

Each sample gets a rank from a keyed hash of (seed, key); each class keeps its `subset` smallest ranks
(bottom-k sampling). Every subset of that size is equally likely, no shuffle buffer is needed, and the
result is the same whatever the shard order, since it depends only on the set of keys.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable

from .heap import PerClassTopK
from .source import SampleRef


def keyed_u64(seed: int, *parts: object) -> int:
    """A 64-bit integer that is a pure function of (seed, parts): the root of all our randomness."""
    text = "\x1f".join([str(seed), *map(str, parts)])
    return struct.unpack("<Q", hashlib.blake2b(text.encode(), digest_size=8).digest())[0]


def keyed_uniform(seed: int, *parts: object) -> float:
    """Uniform in [0, 1), 53 bits, from (seed, parts)."""
    return (keyed_u64(seed, *parts) >> 11) / float(1 << 53)


def draw_order(seed: int, ref: SampleRef) -> tuple[int, str]:
    return (keyed_u64(seed, "draw", ref.key), ref.key)


class SubsetDraw:
    """Streams sample references in; keeps the drawn ones (bounded: classes x subset)."""

    def __init__(self, seed: int, subset: int):
        self._topk: PerClassTopK[SampleRef] = PerClassTopK(
            subset, order=lambda r: draw_order(seed, r), class_of=lambda r: r.label)

    def offer(self, ref: SampleRef) -> list[SampleRef]:
        """Add a sample; returns samples that are now certainly not drawn."""
        return self._topk.push(ref)

    def finish(self) -> tuple[dict[Hashable, list[SampleRef]], list[SampleRef]]:
        """(drawn samples per class, in draw order; the last samples not drawn)."""
        return self._topk.finish()
