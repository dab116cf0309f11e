"""The records that flow between stages: where a sample lives, why one was skipped, a scored key patch.
Only these (never pixels) survive from one stage to the next."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .keyed import Window, keyed_u64


@dataclass(frozen=True, slots=True)
class Shard:
    name: str  # as written in the job (after brace expansion): samples.tsv and messages name the shard by it
    path: Path | None  # where it is on this machine (None: a stream)
    url: str | None = None  # an http(s):// URL or pipe: command, read as a forward-only stream (rded.streams)
    output_name: str = ""  # its name in the distilled images' provenance (rded.source.output_names)


@dataclass(frozen=True, slots=True)
class ClassInfo:
    index: int
    name: str
    imagenet_index: int | None = None


@dataclass(frozen=True, slots=True)
class SampleRef:
    key: str
    label: int
    shard: int  # index into the job's shard list
    offset: int  # byte offset of the image member's data in the shard
    size: int  # byte size of the image member


@dataclass(frozen=True, slots=True)
class Skipped:
    key: str
    shard: int
    reason: str  # missing_image | missing_label | bad_label | corrupt_shard (others are decided later)
    offset: int = -1  # data offset of the sample's first member (-1: where a broken shard stopped)


@dataclass(frozen=True, slots=True)
class ScoredPatch:
    """A key patch: the best crop of one drawn image, and where to find it again."""

    score: float  # rounded log-probability of the true class
    key: str
    label: int
    shard: int
    offset: int
    size: int
    crop_index: int
    window: Window  # x, y, w, h in source pixels
    image_size: tuple[int, int]  # W, H


def best_first(p: ScoredPatch) -> tuple[float, str]:
    """Higher score first; equal (rounded) scores broken by sample key, so no order is left to chance."""
    return (-p.score, p.key)


def draw_order(seed: int, ref: SampleRef | ScoredPatch) -> tuple[int, str]:
    """A sample's place in the seeded uniform order of its class (bottom-k sampling keeps the first ones)."""
    return (keyed_u64(seed, "draw", ref.key), ref.key)


class SampleRows:
    """SampleRef as a numpy row (rded.heap.Rows): 24 B plus its key, where the object costs ~250 B."""

    fields = [("label", "<i4"), ("shard", "<i4"), ("offset", "<i8"), ("size", "<i8")]

    @staticmethod
    def row(r: SampleRef) -> tuple:
        return (r.label, r.shard, r.offset, r.size)

    @staticmethod
    def item(key: str, row: np.void) -> SampleRef:
        return SampleRef(key, int(row["label"]), int(row["shard"]), int(row["offset"]), int(row["size"]))


class PatchRows:
    """ScoredPatch as a numpy row (rded.heap.Rows): 58 B plus its key, where the object costs ~400 B."""

    fields = [("score", "<f8"), ("label", "<i4"), ("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"),
              ("crop_index", "<i2"), ("window", "<i4", (4,)), ("image_size", "<i4", (2,))]

    @staticmethod
    def row(p: ScoredPatch) -> tuple:
        return (p.score, p.label, p.shard, p.offset, p.size, p.crop_index, p.window, p.image_size)

    @staticmethod
    def item(key: str, row: np.void) -> ScoredPatch:
        w, s = row["window"].tolist(), row["image_size"].tolist()
        return ScoredPatch(float(row["score"]), key, int(row["label"]), int(row["shard"]), int(row["offset"]),
                           int(row["size"]), int(row["crop_index"]), (w[0], w[1], w[2], w[3]), (s[0], s[1]))
