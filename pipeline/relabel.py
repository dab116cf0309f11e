"""Relabel: soft labels from the observer for every distilled image, region by region and for V
training views, each view a pure function of (seed, image key, view index).

A view is what the authors' training does to an image: shuffle the factor x factor grid (columns, then
rows), RandomResizedCrop to S with scale (1/factor, 1) and ratio (3/4, 4/3), horizontal flip. Labels
are computed on the image as decoded from its stored bytes, which is exactly what a training loop sees.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .crops import Window, random_resized_crop
from .labels import kl_divergence, pack_labels, region_dtype, unpack_logits, view_dtype
from .score import Scorer
from .select import keyed_u64
from .write import cell_boxes

VIEW_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True, slots=True)
class View:
    col_perm: tuple[int, ...]
    row_perm: tuple[int, ...]
    crop: Window  # x, y, w, h on the grid-shuffled image
    flip: bool


def keyed_permutation(n: int, seed: int, *parts: object) -> tuple[int, ...]:
    return tuple(sorted(range(n), key=lambda i: keyed_u64(seed, *parts, i)))


def draw_view(seed: int, key: str, view_index: int, resolution: int, factor: int) -> View:
    parts = ("view", key, view_index)
    return View(
        col_perm=keyed_permutation(factor, seed, *parts, "col"),
        row_perm=keyed_permutation(factor, seed, *parts, "row"),
        crop=random_resized_crop(seed, parts, resolution, resolution, (1.0 / factor, 1.0), VIEW_RATIO),
        flip=keyed_u64(seed, *parts, "flip") % 2 == 1,
    )


def decode_distilled(encoded: bytes) -> torch.Tensor:
    """uint8 CHW RGB: one decoder for the relabel stage and the loader, so labels match training input."""
    with Image.open(io.BytesIO(encoded)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def shuffle_grid(image: torch.Tensor, col_perm: tuple[int, ...], row_perm: tuple[int, ...]) -> torch.Tensor:
    """Permute the grid's column strips, then its row strips (cells keep their own sizes)."""
    # the image is square, so one set of strip bounds serves columns and rows
    bounds = [(b[0], b[2]) for b in cell_boxes(image.shape[-1], len(col_perm))[:len(col_perm)]]
    image = torch.cat([image[..., :, bounds[c][0]:bounds[c][1]] for c in col_perm], dim=-1)
    return torch.cat([image[..., bounds[r][0]:bounds[r][1], :] for r in row_perm], dim=-2)


def apply_view(image: torch.Tensor, view: View, resolution: int) -> torch.Tensor:
    """The training view of a distilled image: uint8 CHW in, uint8 CHW (S x S) out."""
    out = shuffle_grid(image, view.col_perm, view.row_perm)
    x, y, w, h = view.crop
    out = TF.resized_crop(out, top=y, left=x, height=h, width=w, size=[resolution, resolution], antialias=True)
    return out.flip(-1) if view.flip else out


@dataclass
class ImageLabels:
    views: np.ndarray  # structured, view_dtype
    regions: np.ndarray  # structured, region_dtype
    kl: dict[float, float]  # temperature -> summed KL(stored || exact) over views and regions
    count: int  # labels (views + regions) in the sums


class Relabeler:
    def __init__(self, scorer: Scorer, *, seed: int, views: int, resolution: int, factor: int, topk: int,
                 temperatures: tuple[float, ...] = (1.0, 20.0)):
        self.scorer = scorer
        self.seed, self.views, self.resolution, self.factor = seed, views, resolution, factor
        self.num_classes = len(scorer.observer.output_index)
        self.view_dtype = view_dtype(factor, self.num_classes, topk)
        self.region_dtype = region_dtype(self.num_classes, topk)
        self.temperatures = temperatures

    def label(self, key: str, encoded: bytes) -> ImageLabels:
        image = decode_distilled(encoded)
        views = np.zeros(self.views, self.view_dtype)
        batch = []
        for v in range(self.views):
            view = draw_view(self.seed, key, v, self.resolution, self.factor)
            views[v]["view"], views[v]["col_perm"], views[v]["row_perm"] = v, view.col_perm, view.row_perm
            views[v]["crop"], views[v]["flip"] = view.crop, view.flip
            batch.append(apply_view(image, view, self.resolution))
        view_lp = self.scorer.log_probs(torch.stack(batch).permute(0, 2, 3, 1)).numpy() if batch else \
            np.zeros((0, self.num_classes), np.float32)
        pack_labels(views, view_lp)

        cells = cell_boxes(self.resolution, self.factor)
        regions = np.zeros(len(cells), self.region_dtype)
        region_lp = np.zeros((len(cells), self.num_classes), np.float32)
        hwc = image.permute(1, 2, 0)
        for size in sorted({(b[2] - b[0], b[3] - b[1]) for b in cells}):  # cells of one size per call
            idx = [i for i, b in enumerate(cells) if (b[2] - b[0], b[3] - b[1]) == size]
            patches = torch.stack([hwc[cells[i][1]:cells[i][3], cells[i][0]:cells[i][2]] for i in idx])
            region_lp[idx] = self.scorer.log_probs(patches).numpy()
        regions["cell"] = np.arange(len(cells))
        pack_labels(regions, region_lp)

        exact = np.concatenate([view_lp, region_lp])
        stored = np.concatenate([unpack_logits(views, self.num_classes), unpack_logits(regions, self.num_classes)])
        kl = {t: float(kl_divergence(stored, exact, t).sum()) for t in self.temperatures}
        return ImageLabels(views, regions, kl, len(exact))
