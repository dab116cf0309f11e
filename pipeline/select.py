"""Select: the seeded uniform subset of `subset` samples per class, independent of input order.

Each sample gets a rank from a keyed hash of (seed, key); each class keeps its `subset` smallest ranks
(bottom-k sampling). Every subset of that size is equally likely, no shuffle buffer is needed, and the
result is the same whatever the shard order, since it depends only on the set of keys.
"""

from __future__ import annotations

from collections.abc import Hashable

from .heap import PerClassTopK, Rows
from .records import SampleRef, SampleRows, draw_order


class SubsetDraw:
    """Streams sample references in; keeps the drawn ones (bounded: classes x subset)."""

    def __init__(self, seed: int, subset: int):
        self.seed, self.subset = seed, subset
        # the kept samples are the index pass's largest live set (300,000 at ImageNet scale): numpy rows, ~50 B
        # each, so memory hardly depends on how many are drawn
        self._topk: PerClassTopK[SampleRef] = PerClassTopK(subset, order=self.order, class_of=lambda r: r.label,
                                                           slack=32, codec=SampleRows)

    def order(self, ref: SampleRef) -> tuple[int, str]:
        return draw_order(self.seed, ref)

    def offer(self, ref: SampleRef) -> list[SampleRef]:
        """Add a sample; returns samples that are now certainly not drawn."""
        return self._topk.push(ref)

    def finish(self) -> tuple[dict[Hashable, Rows[SampleRef]], list[SampleRef]]:
        """(drawn samples per class, in draw order; the last samples not drawn)."""
        return self._topk.finish()
