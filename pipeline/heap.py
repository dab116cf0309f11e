"""Per-class top-k: keeps only the best entries (scores and coordinates, never pixels).

The same exact mechanism serves two stages: the subset draw keeps the `subset` smallest keyed hashes
per class (bottom-k sampling) and the ranking keeps the N x IPC best-scored key patches per class.
Merging is exact: the top-k of a union is the top-k of the parts' top-ks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class TopK(Generic[T]):
    """The k smallest items by `order` (a total order: make ties impossible, e.g. end with the key).

    Items are appended and the buffer is cut back to k whenever it reaches k + slack (default slack k), so
    memory stays O(k) and the cost is O(n log k) amortised; a smaller slack holds fewer items at the cost
    of more frequent sorts. `push` returns what was dropped, for accounting.
    """

    def __init__(self, k: int, order: Callable[[T], Any], slack: int | None = None):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.order = order
        self._limit = k + max(1, k if slack is None else slack)
        self._items: list[T] = []

    def push(self, item: T) -> list[T]:
        self._items.append(item)
        if len(self._items) >= self._limit:
            return self._cut()
        return []

    def _cut(self) -> list[T]:
        self._items.sort(key=self.order)
        dropped = self._items[self.k:]
        del self._items[self.k:]
        return dropped

    def finish(self) -> tuple[list[T], list[T]]:
        """(kept items, best first; items dropped by this final cut)."""
        dropped = self._cut()
        return list(self._items), dropped

    def __len__(self) -> int:
        return len(self._items)


class PerClassTopK(Generic[T]):
    def __init__(self, k: int, order: Callable[[T], Any], class_of: Callable[[T], Hashable],
                 slack: int | None = None):
        self.k, self.order, self.class_of, self.slack = k, order, class_of, slack
        self._heaps: dict[Hashable, TopK[T]] = {}

    def push(self, item: T) -> list[T]:
        c = self.class_of(item)
        heap = self._heaps.get(c)
        if heap is None:
            heap = self._heaps[c] = TopK(self.k, self.order, self.slack)
        return heap.push(item)

    def push_all(self, items: Iterable[T]) -> list[T]:
        dropped: list[T] = []
        for item in items:
            dropped.extend(self.push(item))
        return dropped

    def finish(self) -> tuple[dict[Hashable, list[T]], list[T]]:
        kept: dict[Hashable, list[T]] = {}
        dropped: list[T] = []
        for c in sorted(self._heaps):
            kept[c], d = self._heaps[c].finish()
            dropped.extend(d)
        return kept, dropped

