"""Write: the stitching plan (nested tiers), stitching of the winners, distilled shards, contact sheet.

Only the winners are re-read and re-decoded; each grid cell is cut from the source image at the cell's
own size (not resized twice). Shards are ordered tier by tier, so a slice is a set of whole shards.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .crops import Cutter, CutRequest
from .geometry import cell_boxes, tier_layout
from .records import ScoredPatch, Shard
from .rundir import ShardRecord, image_shard_name
from .tario import write_bytes_atomic, write_tar

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: bytes}) as it goes into a shard


@dataclass(frozen=True, slots=True)
class PlannedImage:
    label: int
    image_index: int
    tier: int
    ranks: tuple[int, ...]  # the class's winner of each cell, row-major
    winners: Sequence[ScoredPatch]  # the class's winners, best first (numpy rows at scale: patches are read on use)

    @property
    def key(self) -> str:
        return f"{self.label:05d}_{self.image_index:04d}"

    @property
    def patches(self) -> tuple[tuple[int, ScoredPatch], ...]:
        """(rank, patch) per cell, row-major."""
        return tuple((r, self.winners[r]) for r in self.ranks)


def contact_sheet_rows(plan: Sequence[PlannedImage], rows: int) -> frozenset[int]:
    """The first `rows` classes that have images: with 1,000 observer classes and data for a few, the
    sheet shows those few rather than rows of empty classes."""
    return frozenset(sorted({image.label for image in plan})[:rows])


def plan_images(winners: dict[int, Sequence[ScoredPatch]], tiers: Sequence[int], cells: int) -> list[PlannedImage]:
    """All distilled images in output order: tier by tier, class by class, image by image."""
    per_class = {c: tier_layout(tiers, cells, len(w)) for c, w in winners.items()}
    plan: list[PlannedImage] = []
    prev = 0
    for t in tiers:
        for c in sorted(winners):
            for j in range(prev, min(t, len(per_class[c]))):
                ranks = per_class[c][j]
                plan.append(PlannedImage(c, j, t, tuple(ranks), winners[c]))
        prev = t
    return plan


@dataclass
class WriteSettings:
    resolution: int
    factor: int
    shard_size: int
    image_format: str
    jpeg_quality: int
    sheet_classes: frozenset[int]  # the contact sheet's rows (contact_sheet_rows)
    sheet_images: int


@dataclass
class WriteResult:
    shards: list[ShardRecord] = field(default_factory=list)
    images_per_class: dict[int, int] = field(default_factory=dict)
    thumbnails: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)


def encode_image(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def output_shards(plan: list[PlannedImage], shard_size: int) -> Iterator[list[PlannedImage]]:
    """Shard-sized runs of the plan; a tier always starts a new shard."""
    chunk: list[PlannedImage] = []
    for image in plan:
        if chunk and (len(chunk) == shard_size or image.tier != chunk[-1].tier):
            yield chunk
            chunk = []
        chunk.append(image)
    if chunk:
        yield chunk


def provenance(image: PlannedImage, boxes: Sequence[tuple[int, int, int, int]], settings: WriteSettings,
               shards: Sequence[Shard], class_name: str) -> dict[str, Any]:
    return {
        "class": image.label,
        "class_name": class_name,
        "image_index": image.image_index,
        "tier": image.tier,
        "resolution": settings.resolution,
        "factor": settings.factor,
        "cells": [
            {
                "cell": k,
                "box": list(box),
                "rank": rank,
                "score": p.score,
                "source": {"key": p.key, "shard": shards[p.shard].output_name, "crop_index": p.crop_index,
                           "window": list(p.window), "image_size": list(p.image_size)},
            }
            for k, ((rank, p), box) in enumerate(zip(image.patches, boxes))
        ],
    }


def cut_canvases(chunk: Sequence[PlannedImage], shards: Sequence[Shard], resolution: int, factor: int,
                 cutter: Cutter, read: Callable[[ScoredPatch], bytes]) -> list[np.ndarray]:
    """The stitched images (uint8 S x S x 3) of `chunk`: each cell re-cut from its source image at the cell's
    own size. `read` gives a patch's source image bytes."""
    boxes = cell_boxes(resolution, factor)
    patches = [image.patches for image in chunk]  # rebuilt from numpy rows on each access: once here
    requests = []
    for cells in patches:
        for (rank, p), (x0, y0, x1, y1) in zip(cells, boxes):
            encoded = read(p)
            requests.append(CutRequest(encoded, [p.window], [(x1 - x0, y1 - y0)], p.image_size[0] * p.image_size[1]))
    cut = cutter.cut(requests)
    canvases = []
    for i, cells in enumerate(patches):
        canvas = np.zeros((resolution, resolution, 3), np.uint8)
        for ((rank, p), (x0, y0, x1, y1), patch) in zip(cells, boxes, cut[i * len(boxes):(i + 1) * len(boxes)]):
            if patch is None:  # decoded when scored, so only a changed file gets here
                raise RuntimeError(f"source image {p.key} in {shards[p.shard].name} no longer decodes")
            canvas[y0:y1, x0:x1] = patch[0]
        canvases.append(canvas)
    return canvases


# a refined image and its record for the provenance, by image key (None: the stitched image as it is)
RefinedSource = Callable[[PlannedImage], "tuple[np.ndarray, dict[str, Any]]"]


def stitch(chunk: list[PlannedImage], shards: Sequence[Shard], class_names: dict[int, str],
           settings: WriteSettings, cutter: Cutter, result: WriteResult,
           read: Callable[[ScoredPatch], bytes], on_image: Callable[[int], None] = lambda n: None,
           refined: RefinedSource | None = None) -> list[Sample]:
    """The distilled images of one output shard (stitched from source bytes that `read` gives, or their
    refined form from `refined`), encoded, with class and provenance. Counts and contact-sheet thumbnails
    go to `result`."""
    boxes = cell_boxes(settings.resolution, settings.factor)
    if refined is None:
        made = [(canvas, None) for canvas in cut_canvases(chunk, shards, settings.resolution, settings.factor,
                                                            cutter, read)]
    else:
        made = [refined(image) for image in chunk]
    samples = []
    for image, (canvas, refine_record) in zip(chunk, made):
        meta = provenance(image, boxes, settings, shards, class_names[image.label])
        if refine_record is not None:
            meta["refine"] = refine_record
        samples.append((image.key, {
            settings.image_format: encode_image(canvas, settings.image_format, settings.jpeg_quality),
            "cls": str(image.label).encode(),
            "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
        }))
        result.images_per_class[image.label] = result.images_per_class.get(image.label, 0) + 1
        if image.label in settings.sheet_classes and image.image_index < settings.sheet_images:
            result.thumbnails[(image.label, image.image_index)] = thumbnail(canvas)
        on_image(1)
    return samples


def write_image_shard(out_dir: Path, shard_no: int, tier: int, samples: list[Sample]) -> ShardRecord:
    path = out_dir / image_shard_name(shard_no)
    sha = write_tar(path, samples)
    return ShardRecord(path.name, tier, len(samples), path.stat().st_size, sha)


THUMB = 96


def thumbnail(canvas: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(canvas).resize((THUMB, THUMB), Image.Resampling.BILINEAR))


def merge_results(parts: Sequence[WriteResult]) -> WriteResult:
    """The ranks' write results as one (shards in name order)."""
    merged = WriteResult(shards=sorted((s for p in parts for s in p.shards), key=lambda s: s.name))
    for p in parts:
        for c, n in p.images_per_class.items():
            merged.images_per_class[c] = merged.images_per_class.get(c, 0) + n
        merged.thumbnails.update(p.thumbnails)
    return merged


def write_contact_sheet(path: Path, thumbnails: dict[tuple[int, int], np.ndarray], thumb: int = THUMB) -> None:
    """A grid of distilled images: a row per class (capped), its first images left to right."""
    if not thumbnails:
        return
    rows = sorted({c for c, _ in thumbnails})
    cols = max(j for _, j in thumbnails) + 1
    sheet = Image.new("RGB", (cols * (thumb + 2) + 2, len(rows) * (thumb + 2) + 2), (255, 255, 255))
    for r, c in enumerate(rows):
        for j in range(cols):
            if (c, j) in thumbnails:
                sheet.paste(Image.fromarray(thumbnails[(c, j)]), (2 + j * (thumb + 2), 2 + r * (thumb + 2)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
