"""Per-class top-k: keeps only the best entries (scores and coordinates, never pixels).

The same exact mechanism serves two stages: the subset draw keeps the `subset` smallest keyed hashes
per class (bottom-k sampling) and the ranking keeps the N x IPC best-scored key patches per class.
Merging is exact: the top-k of a union is the top-k of the parts' top-ks.

At ImageNet scale the kept items are the job's largest live set (300 drawn samples, then 200 key
patches, per class, for 1,000 classes), so `PerClassTopK` can keep them as numpy rows (`Rows`) instead
of Python objects: memory then no longer follows how many items are kept by much.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar, overload

import numpy as np

T = TypeVar("T")


class RowCodec(Protocol[T]):
    """How an item becomes a numpy row and back (rded.records.SampleRows, PatchRows)."""

    fields: list[tuple]

    def row(self, item: T) -> tuple: ...

    def item(self, key: str, row: np.void) -> T: ...


def _encode_key(key: str) -> bytes:
    # UTF-8 keeps code-point order, so byte order sorts as str does; surrogatepass for undecodable tar names
    return key.encode("utf-8", "surrogatepass")


class Rows(Sequence[T]):
    """Items kept as rows of a numpy structured array (the order's number, the key as UTF-8, the codec's
    fields); reading an item rebuilds it."""

    def __init__(self, codec: RowCodec[T], array: np.ndarray):
        self.codec, self.array = codec, array

    @classmethod
    def of(cls, codec: RowCodec[T], items: Sequence[T], order: Callable[[T], tuple[Any, str]],
           ranks: Sequence[tuple[Any, str]] | None = None) -> Rows[T]:
        """Items as rows; `ranks`, when given, are their `order` values already computed."""
        if ranks is None:
            ranks = [order(item) for item in items]
        numbers = [n for n, _ in ranks]
        number_type = "<f8" if any(isinstance(n, float) for n in numbers) else "<u8"
        keys = np.array([_encode_key(k) for _, k in ranks], dtype=bytes) if ranks else np.zeros(0, "S1")
        dtype = np.dtype([("order", number_type), ("key", keys.dtype)] + codec.fields)
        array = np.empty(len(items), dtype)
        array["order"] = numbers
        array["key"] = keys
        for name, values in zip(dtype.names[2:], zip(*(codec.row(item) for item in items))):
            array[name] = values
        return cls(codec, array)

    def concat(self, *others: Rows[T]) -> Rows[T]:
        """These rows and others' (same codec) in one array, its key column as wide as the widest."""
        parts = [self.array] + [o.array for o in others]
        width = max(p.dtype["key"].itemsize for p in parts)
        numbers = {p.dtype["order"] for p in parts if len(p)} or {parts[0].dtype["order"]}
        if len(numbers) > 1:
            raise ValueError(f"rows ordered by different number types: {sorted(map(str, numbers))}")
        number = numbers.pop()
        dtype = np.dtype([("order", number), ("key", f"S{width}")] + self.codec.fields)
        return Rows(self.codec, np.concatenate([p.astype(dtype) for p in parts]))

    def sorted(self) -> Rows[T]:
        """By (order, key): the same order as the items' (number, key) tuples."""
        return Rows(self.codec, self.array[np.lexsort((self.array["key"], self.array["order"]))])

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(row) for row in self.array[i]]
        return self._item(self.array[i])

    def __iter__(self) -> Iterator[T]:
        return (self._item(row) for row in self.array)

    def _item(self, row: np.void) -> T:
        return self.codec.item(row["key"].decode("utf-8", "surrogatepass"), row)


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


class RowTopK(Generic[T]):
    """TopK keeping its items as numpy rows: `order(item)` must be (number, key), the number a float or a
    non-negative int below 2**64. Once k rows are kept, an item ordered after the last of them is dropped
    at once; the others wait as objects (up to `slack`) and each cut sorts them in with the rows. The same
    items as TopK with the same order, in the same order (tested against it)."""

    def __init__(self, k: int, order: Callable[[T], tuple[Any, str]], codec: RowCodec[T], slack: int = 32):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k, self.order, self.codec, self.slack = k, order, codec, max(1, slack)
        self._rows: Rows[T] | None = None
        self._last: tuple[Any, str] | None = None  # the k-th kept item's order, once k are kept
        self._pending: list[T] = []
        self._pending_ranks: list[tuple[Any, str]] = []

    def push(self, item: T) -> list[T]:
        rank = self.order(item)
        if self._last is not None and rank > self._last:
            return [item]
        self._pending.append(item)
        self._pending_ranks.append(rank)
        if len(self._pending) >= self.slack:
            return self._cut()
        return []

    def _cut(self) -> list[T]:
        rows = Rows.of(self.codec, self._pending, self.order, self._pending_ranks)
        self._pending, self._pending_ranks = [], []
        if self._rows is not None:
            rows = self._rows.concat(rows)
        rows = rows.sorted()
        self._rows = Rows(self.codec, rows.array[:self.k].copy())
        if len(self._rows) == self.k:
            last = self._rows.array[-1]
            number = last["order"].item()
            self._last = (number, last["key"].decode("utf-8", "surrogatepass"))
        return rows[self.k:]

    def finish(self) -> tuple[Rows[T], list[T]]:
        """(kept items as rows, best first; items dropped by this final cut)."""
        dropped = self._cut()
        return self._rows, dropped

    def __len__(self) -> int:
        return len(self._pending) + (len(self._rows) if self._rows is not None else 0)


class PerClassTopK(Generic[T]):
    """A top-k per class; with `codec`, each class's kept items are numpy rows (RowTopK)."""

    def __init__(self, k: int, order: Callable[[T], Any], class_of: Callable[[T], Hashable],
                 slack: int | None = None, codec: RowCodec[T] | None = None):
        self.k, self.order, self.class_of, self.slack, self.codec = k, order, class_of, slack, codec
        self._heaps: dict[Hashable, TopK[T] | RowTopK[T]] = {}

    def push(self, item: T) -> list[T]:
        c = self.class_of(item)
        heap = self._heaps.get(c)
        if heap is None:
            heap = self._heaps[c] = (TopK(self.k, self.order, self.slack) if self.codec is None
                                     else RowTopK(self.k, self.order, self.codec, self.slack or 32))
        return heap.push(item)

    def push_all(self, items: Iterable[T]) -> list[T]:
        dropped: list[T] = []
        for item in items:
            dropped.extend(self.push(item))
        return dropped

    def finish(self) -> tuple[dict[Hashable, Sequence[T]], list[T]]:
        kept: dict[Hashable, Sequence[T]] = {}
        dropped: list[T] = []
        for c in sorted(self._heaps):
            kept[c], d = self._heaps[c].finish()
            dropped.extend(d)
        return kept, dropped

