"""Grid, tier and view geometry, with numpy alone: where each patch sits in a distilled image, which patch
ranks each tier uses, and the parameters of the training views (grid shuffle, RandomResizedCrop, flip) that
soft labels are stored for. (rded.geometry applies the views to torch tensors, rded.numpy_reader to arrays.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .keyed import Window, keyed_permutation, keyed_u64, random_resized_crop

VIEW_RATIO = (3 / 4, 4 / 3)  # the authors' training RandomResizedCrop ratio


def cell_boxes(resolution: int, factor: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each cell, row-major; the first rows/columns take the leftover pixels."""
    base, extra = divmod(resolution, factor)
    sizes = [base + 1 if i < extra else base for i in range(factor)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [(starts[c], starts[r], starts[c + 1], starts[r + 1]) for r in range(factor) for c in range(factor)]


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


@dataclass(frozen=True, slots=True)
class View:
    col_perm: tuple[int, ...]
    row_perm: tuple[int, ...]
    crop: Window  # x, y, w, h on the grid-shuffled image
    flip: bool


def draw_view(seed: int, key: str, view_index: int, resolution: int, factor: int,
              scale: tuple[float, float] | None = None) -> View:
    """Training view `view_index` of distilled image `key`: what the authors' training does to it (the grid
    shuffle of `factor`, RandomResizedCrop with `scale`, by default (1 / factor, 1), a flip)."""
    parts = ("view", key, view_index)
    return View(
        col_perm=keyed_permutation(factor, seed, *parts, "col"),
        row_perm=keyed_permutation(factor, seed, *parts, "row"),
        crop=random_resized_crop(seed, parts, resolution, resolution, scale or (1.0 / factor, 1.0), VIEW_RATIO),
        flip=keyed_u64(seed, *parts, "flip") % 2 == 1,
    )


def view_grid_of(job: Mapping[str, Any]) -> int:
    """The grid shuffle of a run's training views, from the job its manifest records."""
    return job.get("relabel", {}).get("view_grid") or job["distill"]["factor"]


def stored_view(record: np.void) -> View:
    """The view a stored label record was computed for (rded.labels' view records)."""
    return View(col_perm=tuple(int(i) for i in record["col_perm"]), row_perm=tuple(int(i) for i in record["row_perm"]),
                crop=tuple(int(i) for i in record["crop"]), flip=bool(record["flip"]))
