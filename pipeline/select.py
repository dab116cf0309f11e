"""Select: the seeded uniform subset of `subset` samples per class, independent of input order.

Each sample gets a rank from a keyed hash of (seed, key); each class keeps its `subset` smallest ranks
(bottom-k sampling). Every subset of that size is equally likely, no shuffle buffer is needed, and the
result is the same whatever the shard order, since it depends only on the set of keys.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from .heap import PerClassTopK, ScoredPatch
from .report import EXCLUDED, NOT_DRAWN, SKIPPED, Ledger
from .source import SampleRef, Shard, Skipped, scan_shard

if TYPE_CHECKING:
    from .dist import Ranks


def keyed_u64(seed: int, *parts: object) -> int:
    """A 64-bit integer that is a pure function of (seed, parts): the root of all our randomness."""
    text = "\x1f".join([str(seed), *map(str, parts)])
    return struct.unpack("<Q", hashlib.blake2b(text.encode(), digest_size=8).digest())[0]


def keyed_uniform(seed: int, *parts: object) -> float:
    """Uniform in [0, 1), 53 bits, from (seed, parts)."""
    return (keyed_u64(seed, *parts) >> 11) / float(1 << 53)


def draw_order(seed: int, ref: SampleRef | ScoredPatch) -> tuple[int, str]:
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


def index_and_draw(shards: Sequence[Shard], *, seed: int, subset: int, num_classes: int, wanted: set[int],
                   ledger: Ledger, ranks: Ranks) -> tuple[list[SampleRef], int, dict[int, int]]:
    """Walk the headers of the shards this rank owns; record each sample that is skipped, excluded or not
    drawn; merge the ranks' per-class draws exactly (the bottom-k of a union is the bottom-k of the parts'
    bottom-ks), so the drawn set is the single-process one.

    Returns this rank's drawn samples in reading order (shard name, offset): sequential within a shard,
    and the same whatever order the job lists its shards in; the samples seen by all ranks; and the
    drawn count per class over all ranks.
    """
    draw = SubsetDraw(seed, subset)
    seen = 0
    for i in ranks.shard_indices(len(shards)):
        shard = shards[i]
        for rec in scan_shard(i, shard.path):
            if not ranks.owns_sample(i, rec.key):
                continue
            seen += 1
            if isinstance(rec, Skipped):
                ledger.record(rec.key, shard.name, SKIPPED, rec.reason)
            elif not 0 <= rec.label < num_classes:
                ledger.record(rec.key, shard.name, SKIPPED, "unknown_class")
            elif rec.label not in wanted:
                ledger.record(rec.key, shard.name, EXCLUDED)
            else:
                for r in draw.offer(rec):
                    ledger.record(r.key, shards[r.shard].name, NOT_DRAWN)
    local_by_class, dropped = draw.finish()
    for r in dropped:
        ledger.record(r.key, shards[r.shard].name, NOT_DRAWN)
    local = [r for refs in local_by_class.values() for r in refs]
    merged = SubsetDraw(seed, subset)
    for part in ranks.gather(local):
        for r in part:
            merged.offer(r)
    drawn_by_class, _ = merged.finish()
    drawn_ids = {(r.shard, r.key) for refs in drawn_by_class.values() for r in refs}
    mine = []
    for r in local:
        if (r.shard, r.key) in drawn_ids:
            mine.append(r)
        else:
            ledger.record(r.key, shards[r.shard].name, NOT_DRAWN)
    mine.sort(key=lambda r: (shards[r.shard].name, r.offset))
    return mine, sum(ranks.gather(seen)), {c: len(v) for c, v in drawn_by_class.items()}
