"""The records that flow between stages: where a sample lives, why one was skipped, a scored key patch.
Only these (never pixels) survive from one stage to the next."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
