"""Relabel: soft labels from the observer for every distilled image, region by region and for V
training views, each view a pure function of (seed, image key, view index).

A view is what the authors' training does to an image: shuffle the factor x factor grid (columns, then
rows), RandomResizedCrop to S with scale (1/factor, 1) and ratio (3/4, 4/3), horizontal flip. The view's
grid and scale can differ from the stitching (relabel.view_grid, view_scale: a random baseline trained
with RDED's views, or with ImageNet's). Labels
are computed on the image as decoded from its stored bytes, which is exactly what a training loop sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .geometry import View, apply_view, cell_boxes, decode_distilled, draw_view
from .labels import (LABELS_FORMAT, LABELS_MEMBER, encode_image_labels, image_tail, kl_divergence, pack_labels,
                     region_dtype, unpack_logits, view_dtype)
from .rundir import label_shard_name
from .score import Scorer
from .tario import write_tar


@dataclass
class ImageLabels:
    views: np.ndarray  # structured, view_dtype
    regions: np.ndarray  # structured, region_dtype
    tail: np.ndarray | None  # f2[1 + tail_rank, C], the image's tail basis; None when the labels are exact
    kl: dict[float, float]  # temperature -> summed KL(stored || exact) over views and regions
    count: int  # labels (views + regions) in the sums


class Relabeler:
    def __init__(self, scorer: Scorer, *, seed: int, views: int, resolution: int, factor: int, topk: int,
                 exact_classes: int = 0, tail_rank: int = 0, temperatures: tuple[float, ...] = (1.0, 20.0),
                 view_grid: int | None = None, view_scale: tuple[float, float] | None = None):
        self.scorer = scorer
        self.seed, self.views, self.resolution, self.factor = seed, views, resolution, factor
        self.view_grid = view_grid or factor
        self.view_scale = view_scale  # None: draw_view's default, (1 / view_grid, 1)
        self.num_classes = len(scorer.observer.output_index)
        # classes stored per label: all of them (exact labels) up to max(topk, exact_classes) classes
        self.topk = self.num_classes if self.num_classes <= max(topk, exact_classes) else topk
        self.tail_rank = tail_rank
        self.view_dtype = view_dtype(self.view_grid, self.num_classes, self.topk, tail_rank=tail_rank, resolution=resolution)
        self.region_dtype = region_dtype(self.num_classes, self.topk, tail_rank=tail_rank)
        self.temperatures = temperatures

    def drawn_views(self, key: str) -> list[View]:
        return [draw_view(self.seed, key, v, self.resolution, self.view_grid, self.view_scale) for v in range(self.views)]

    def view_records(self, key: str, drawn: Sequence[View] | None = None) -> np.ndarray:
        """The image's V view records (of `drawn`, its views if already drawn), geometry filled in, labels not."""
        views = np.zeros(self.views, self.view_dtype)
        for v, view in enumerate(drawn if drawn is not None else self.drawn_views(key)):
            views[v]["col_perm"], views[v]["row_perm"] = view.col_perm, view.row_perm
            views[v]["crop"], views[v]["flip"] = view.crop, view.flip
        return views

    def exact(self, key: str, encoded: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The image's view records (geometry only, labels unset) and the observer's exact
        log-probabilities of its views [V, C] and regions [N, C], float32."""
        return self.exact_many([(key, encoded)])[0]

    def exact_many(self, images: Sequence[tuple[str, bytes]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`exact` for several images, their views (and regions) sharing observer calls: with few views per
        image, one image per call would fill most of each fixed-shape `score_batch` with padding. Rows are
        scored independently, so the result is the same as one image at a time."""
        drawn = [self.drawn_views(key) for key, _ in images]
        views = [self.view_records(key, d) for (key, _), d in zip(images, drawn)]
        decoded = [decode_distilled(encoded) for _, encoded in images]
        batch = [apply_view(image, view, self.resolution) for image, d in zip(decoded, drawn) for view in d]
        view_lp = self.scorer.log_probs(torch.stack(batch).permute(0, 2, 3, 1)).numpy() if batch else \
            np.zeros((0, self.num_classes), np.float32)
        cells = cell_boxes(self.resolution, self.factor)
        region_lp = np.zeros((len(images), len(cells), self.num_classes), np.float32)
        hwcs = [image.permute(1, 2, 0) for image in decoded]
        for size in sorted({(b[2] - b[0], b[3] - b[1]) for b in cells}):  # cells of one size per call
            idx = [i for i, b in enumerate(cells) if (b[2] - b[0], b[3] - b[1]) == size]
            patches = torch.stack([hwc[cells[i][1]:cells[i][3], cells[i][0]:cells[i][2]] for hwc in hwcs for i in idx])
            region_lp[:, idx] = self.scorer.log_probs(patches).numpy().reshape(len(images), len(idx), -1)
        return [(v, view_lp[n * self.views:(n + 1) * self.views], region_lp[n]) for n, v in enumerate(views)]

    def images_per_call(self) -> int:
        """Images whose views fill about one `score_batch` (one image when it has that many views)."""
        return max(1, self.scorer.score_batch // max(self.views, 1))

    def label(self, key: str, encoded: bytes) -> ImageLabels:
        views, view_lp, region_lp = self.exact(key, encoded)
        return self.pack(views, view_lp, region_lp)

    def pack(self, views: np.ndarray, view_lp: np.ndarray, region_lp: np.ndarray) -> ImageLabels:
        """Labels of one image from all its exact log-probabilities (the v2 tail needs every view first)."""
        tail = None if self.topk >= self.num_classes else image_tail(view_lp, region_lp, rank=self.tail_rank)
        pack_labels(views, view_lp, tail)
        regions = np.zeros(len(region_lp), self.region_dtype)
        regions["cell"] = np.arange(len(region_lp))
        pack_labels(regions, region_lp, tail)

        exact = np.concatenate([view_lp, region_lp])
        stored = np.concatenate([unpack_logits(views, self.num_classes, tail),
                                 unpack_logits(regions, self.num_classes, tail)])
        kl = {t: float(kl_divergence(stored, exact, t).sum()) for t in self.temperatures}
        return ImageLabels(views, regions, tail, kl, len(exact))


@dataclass
class LabelStats:
    """Summed fidelity of the stored labels: KL(stored || exact) per temperature, over `count` labels."""

    kl_sums: dict[float, float] = field(default_factory=dict)
    count: int = 0

    def add(self, labels: ImageLabels) -> None:
        for t, v in labels.kl.items():
            self.kl_sums[t] = self.kl_sums.get(t, 0.0) + v
        self.count += labels.count

    @staticmethod
    def merge(parts: Sequence[LabelStats]) -> LabelStats:
        merged = LabelStats()
        for p in parts:
            for t, v in p.kl_sums.items():
                merged.kl_sums[t] = merged.kl_sums.get(t, 0.0) + v
            merged.count += p.count
        return merged

    def mean_kl(self, temperature: float) -> float:
        return float(f"{self.kl_sums.get(temperature, 0.0) / max(self.count, 1):.3e}")


def write_label_shard(out_dir: Path, shard_no: int, samples: Sequence[tuple[str, dict[str, bytes]]],
                      image_format: str, relabeler: Relabeler, stats: LabelStats,
                      on_image: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Soft labels of one distilled shard's images, labelled from their stored (encoded) bytes, written
    as the label shard of the same number; its {name, bytes, sha256}."""
    records = []
    group = relabeler.images_per_call()
    for start in range(0, len(samples), group):
        part = samples[start:start + group]
        exact = relabeler.exact_many([(key, members[image_format]) for key, members in part])
        for (key, _), (views, view_lp, region_lp) in zip(part, exact):
            labels = relabeler.pack(views, view_lp, region_lp)
            stats.add(labels)
            records.append((key, {LABELS_MEMBER: encode_image_labels(labels.views, labels.regions, labels.tail)}))
            on_image(1)
    path = out_dir / label_shard_name(shard_no)
    sha = write_tar(path, records)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha}


def labels_summary(relabeler: Relabeler, stats: LabelStats, image_bytes: int, label_bytes: int) -> dict[str, Any]:
    """The manifest's `labels` entry: format, shape, size against the images, fidelity."""
    return {
        "format": LABELS_FORMAT,
        "views": relabeler.views,
        "regions": relabeler.factor * relabeler.factor,
        "classes": relabeler.num_classes,
        "topk": min(relabeler.topk, relabeler.num_classes),
        "tail_rank": relabeler.tail_rank if relabeler.topk < relabeler.num_classes else 0,
        "bytes": label_bytes,
        "image_bytes": image_bytes,
        "bytes_ratio": round(label_bytes / image_bytes, 4) if image_bytes else None,
        # fidelity of the stored labels: mean KL(stored || exact) over every view and region, in nats
        "mean_kl_t1": stats.mean_kl(1.0),
        "mean_kl_t20": stats.mean_kl(20.0),
    }
