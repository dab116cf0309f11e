"""Write: nested tiers, stitching of the winners, distilled shards, manifest and contact sheet.

Only the winners are re-read and re-decoded; each grid cell is cut from the source image at the cell's
own size (not resized twice). Shards are ordered tier by tier, so a slice is a set of whole shards.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .crops import Cutter, CutRequest
from .heap import ScoredPatch
from .labels import encode_records
from .shardio import read_member, write_bytes_atomic, write_tar
from .source import Shard

if TYPE_CHECKING:
    from .relabel import Relabeler

MANIFEST_FORMAT = "rded-distilled/1"


def tier_layout(tiers: Sequence[int], cells: int, available: int) -> list[list[int]]:
    """For each distilled image of a class, the patch ranks of its cells (row-major).

    Tier (a, b] uses ranks cells*a .. cells*b - 1, rank-strided within itself: with n = b - a images,
    cell k of the tier's image j holds rank cells*a + k*n + j. A class with too few patches gets the
    whole images it can fill, its last tier shrunk (and still rank-strided within itself).
    """
    layout: list[list[int]] = []
    prev = 0
    for t in tiers:
        base = cells * prev
        n = min(t - prev, max(0, (available - base) // cells))
        for j in range(n):
            layout.append([base + k * n + j for k in range(cells)])
        if n < t - prev:
            break
        prev = t
    return layout


def cell_boxes(resolution: int, factor: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each cell, row-major; the first rows/columns take the leftover pixels."""
    base, extra = divmod(resolution, factor)
    sizes = [base + 1 if i < extra else base for i in range(factor)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [(starts[c], starts[r], starts[c + 1], starts[r + 1]) for r in range(factor) for c in range(factor)]


@dataclass(frozen=True, slots=True)
class PlannedImage:
    label: int
    image_index: int
    tier: int
    patches: tuple[tuple[int, ScoredPatch], ...]  # (rank, patch) per cell, row-major

    @property
    def key(self) -> str:
        return f"{self.label:05d}_{self.image_index:04d}"


def plan_images(winners: dict[int, list[ScoredPatch]], tiers: Sequence[int], cells: int) -> list[PlannedImage]:
    """All distilled images in output order: tier by tier, class by class, image by image."""
    per_class = {c: tier_layout(tiers, cells, len(w)) for c, w in winners.items()}
    plan: list[PlannedImage] = []
    prev = 0
    for t in tiers:
        for c in sorted(winners):
            for j in range(prev, min(t, len(per_class[c]))):
                ranks = per_class[c][j]
                plan.append(PlannedImage(c, j, t, tuple((r, winners[c][r]) for r in ranks)))
        prev = t
    return plan


@dataclass
class WriteSettings:
    resolution: int
    factor: int
    shard_size: int
    image_format: str
    jpeg_quality: int
    sheet_classes: int
    sheet_images: int


@dataclass
class WrittenShard:
    name: str
    tier: int
    samples: int
    bytes: int
    sha256: str
    labels: dict[str, Any] | None = None  # the soft-label shard of the same samples: name, bytes, sha256


@dataclass
class WriteResult:
    shards: list[WrittenShard]
    images_per_class: dict[int, int]
    thumbnails: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    relabel_seconds: float = 0.0
    kl_sums: dict[float, float] = field(default_factory=dict)
    labels_counted: int = 0


def encode_image(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _chunks(plan: list[PlannedImage], shard_size: int) -> Iterator[list[PlannedImage]]:
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
                "source": {"key": p.key, "shard": shards[p.shard].name, "crop_index": p.crop_index,
                           "window": list(p.window), "image_size": list(p.image_size)},
            }
            for k, ((rank, p), box) in enumerate(zip(image.patches, boxes))
        ],
    }


def write_distilled(out_dir: Path, plan: list[PlannedImage], shards: Sequence[Shard],
                    class_names: dict[int, str], settings: WriteSettings, cutter: Cutter,
                    relabeler: Relabeler | None = None,
                    on_image: Callable[[int], None] = lambda n: None,
                    owns_output: Callable[[int], bool] = lambda shard_no: True) -> WriteResult:
    """Stitch and write the planned images of the output shards this process owns (all, unless it is one
    rank of many), with their soft labels; returns what was written."""
    boxes = cell_boxes(settings.resolution, settings.factor)
    sheet_classes = set(sorted(class_names)[:settings.sheet_classes])
    result = WriteResult(shards=[], images_per_class={})
    for shard_no, chunk in enumerate(_chunks(plan, settings.shard_size)):
        if not owns_output(shard_no):
            continue
        requests = []
        for image in chunk:
            for (rank, p), (x0, y0, x1, y1) in zip(image.patches, boxes):
                encoded = read_member(shards[p.shard].path, p.offset, p.size)
                requests.append(CutRequest(encoded, [p.window], [(x1 - x0, y1 - y0)]))
        cut = cutter.cut(requests)
        samples = []
        for i, image in enumerate(chunk):
            canvas = np.zeros((settings.resolution, settings.resolution, 3), np.uint8)
            cells = cut[i * len(boxes):(i + 1) * len(boxes)]
            for ((rank, p), (x0, y0, x1, y1), patch) in zip(image.patches, boxes, cells):
                if patch is None:  # decoded when scored, so only a changed file gets here
                    raise RuntimeError(f"source image {p.key} in {shards[p.shard].name} no longer decodes")
                canvas[y0:y1, x0:x1] = patch[0]
            meta = provenance(image, boxes, settings, shards, class_names[image.label])
            samples.append((image.key, {
                settings.image_format: encode_image(canvas, settings.image_format, settings.jpeg_quality),
                "cls": str(image.label).encode(),
                "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
            }))
            result.images_per_class[image.label] = result.images_per_class.get(image.label, 0) + 1
            if image.label in sheet_classes and image.image_index < settings.sheet_images:
                result.thumbnails[(image.label, image.image_index)] = thumbnail(canvas)
            if relabeler is None:
                on_image(1)
        name = f"distilled-{shard_no:06d}.tar"
        path = out_dir / name
        sha = write_tar(path, samples)
        shard = WrittenShard(name, chunk[0].tier, len(samples), path.stat().st_size, sha)
        if relabeler is not None:
            t0 = time.perf_counter()
            shard.labels = write_label_shard(out_dir / f"labels-{shard_no:06d}.tar", samples,
                                             settings.image_format, relabeler, result, on_image)
            result.relabel_seconds += time.perf_counter() - t0
        result.shards.append(shard)
    return result


def write_label_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], image_format: str,
                      relabeler: Relabeler, result: WriteResult,
                      on_image: Callable[[int], None]) -> dict[str, Any]:
    """Soft labels of one distilled shard's images, labelled from their stored (encoded) bytes."""
    records = []
    for key, members in samples:
        labels = relabeler.label(key, members[image_format])
        for t, v in labels.kl.items():
            result.kl_sums[t] = result.kl_sums.get(t, 0.0) + v
        result.labels_counted += labels.count
        records.append((key, {"views.npy.zst": encode_records(labels.views),
                              "regions.npy.zst": encode_records(labels.regions)}))
        on_image(1)
    sha = write_tar(path, records)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha}


THUMB = 96


def thumbnail(canvas: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(canvas).resize((THUMB, THUMB), Image.Resampling.BILINEAR))


def merge_results(parts: Sequence[WriteResult]) -> WriteResult:
    """The ranks' write results as one (shards in name order)."""
    merged = WriteResult(shards=sorted((s for p in parts for s in p.shards), key=lambda s: s.name),
                         images_per_class={})
    for p in parts:
        for c, n in p.images_per_class.items():
            merged.images_per_class[c] = merged.images_per_class.get(c, 0) + n
        merged.thumbnails.update(p.thumbnails)
        for t, v in p.kl_sums.items():
            merged.kl_sums[t] = merged.kl_sums.get(t, 0.0) + v
        merged.labels_counted += p.labels_counted
        merged.relabel_seconds = max(merged.relabel_seconds, p.relabel_seconds)
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


def remove_previous_run(out_dir: Path) -> None:
    """Unmark a finished run first (its manifest), then remove its image and soft-label shards."""
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for old in [*out_dir.glob("distilled-*.tar"), *out_dir.glob("labels-*.tar")]:
        old.unlink()


def write_json(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not an rded manifest (format {manifest.get('format')!r})")
    return manifest


def slice_distilled(src: Path, ipc: int, out_dir: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """The IPC=`ipc` set of a finished run: its shards of tiers <= ipc, copied byte for byte (a tier
    always starts a shard), and a manifest that says so. No model, no recomputation."""
    import shutil

    manifest = read_manifest(src)
    if ipc not in manifest["tiers"]:
        raise ValueError(f"{src}: ipc {ipc} is not a tier of this run; its tiers are {manifest['tiers']} "
                         "(set distill.slices when distilling to get others)")
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: holds a finished run (manifest.json); pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_previous_run(out_dir)
    kept = [s for s in manifest["shards"] if s["tier"] <= ipc]
    for name in [n for s in kept for n in (s["name"], (s.get("labels") or {}).get("name")) if n]:
        tmp = out_dir / f".{name}.partial"
        shutil.copyfile(src / name, tmp)
        tmp.replace(out_dir / name)
    tiers = [t for t in manifest["tiers"] if t <= ipc]
    sliced = dict(manifest, ipc=ipc, tiers=tiers, shards=kept, images=sum(s["samples"] for s in kept),
                  sliced_from={"ipc": manifest["ipc"], "tiers": manifest["tiers"]},
                  classes=[dict(c, images=min(c["images"], ipc)) for c in manifest["classes"]])
    write_json(out_dir / "manifest.json", sliced)
    return sliced
