"""What a user's own PyTorch training loop imports: distilled images with their stored soft labels.

    from rded import DistilledDataset

    ds = DistilledDataset("out/ipc10", temperature=20.0)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                       # before the DataLoader starts its workers
        for images, soft_labels in DataLoader(ds, batch_size=50, shuffle=True, num_workers=2):
            ...

Item i at epoch e is image i after its stored view number e mod V (the exact view the observer labelled)
and the observer's probabilities for that view at the chosen temperature. Reads a full run or a slice,
checking every shard against the sha256 in its manifest. Imports only numpy, zstandard, torch and Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import RunError
from .geometry import View, apply_view, decode_distilled
from .labels import (LABELS_FORMAT, LABELS_FORMAT_V1, LABELS_MEMBER, decode_image_labels, decode_records, needs_tail,
                     softmax, unpack_logits)
from .normalization import IMAGENET
from .rundir import read_manifest, read_verified


def stored_view(record: np.void) -> View:
    return View(col_perm=tuple(int(i) for i in record["col_perm"]), row_perm=tuple(int(i) for i in record["row_perm"]),
                crop=tuple(int(i) for i in record["crop"]), flip=bool(record["flip"]))


class DistilledDataset(Dataset):
    """(image, soft label) pairs of a finished run or slice, for a given epoch.

    image: float32 CHW, ImageNet mean/std normalised (`normalize=False`: uint8 CHW as stored), of side
    `resolution` (default: the run's S; another size resizes the view's crop to it directly).
    label: float32 [C], softmax of the stored view logits at `temperature`; `label="class"` gives the
    class index instead (hard labels, or a teacher run online).
    """

    def __init__(self, run_dir: str | Path, *, epoch: int = 0, temperature: float = 1.0, normalize: bool = True,
                 resolution: int | None = None, label: str = "soft"):
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir)
        if manifest.labels is None:
            raise RunError(f"{run_dir}: this run has no soft labels (relabel.enabled was false)")
        if label not in ("soft", "class"):
            raise ValueError(f"label must be 'soft' or 'class', not {label!r}")
        if manifest.labels.get("format") not in (LABELS_FORMAT, LABELS_FORMAT_V1):
            raise RunError(f"{run_dir}: soft labels in format {manifest.labels.get('format')!r}; this version reads "
                           f"{LABELS_FORMAT_V1} and {LABELS_FORMAT}")
        self.label = label
        self.ipc = manifest.ipc
        self.resolution = resolution or manifest.resolution
        self.num_classes = manifest.labels["classes"]
        self.num_views = manifest.labels["views"]
        if self.num_views < 1:
            raise RunError(f"{run_dir}: the run stored no training views (relabel.views = 0)")
        self.temperature, self.normalize, self.epoch = temperature, normalize, epoch
        self.keys: list[str] = []
        self.images: list[bytes] = []
        self.targets: list[int] = []
        self.views: list[np.ndarray] = []
        self.tails: list[np.ndarray | None] = []  # v2 partial labels: the image's tail shape
        for shard in manifest.shards:
            images = read_verified(run_dir, shard.name, shard.sha256)
            labels = read_verified(run_dir, shard.labels["name"], shard.labels["sha256"])
            for key, members in images.items():
                self.keys.append(key)
                self.images.append(members[manifest.image_format])
                self.targets.append(int(members["cls"]))
                views, tail = self._read_labels(run_dir, shard.labels["name"], key, labels.get(key, {}))
                self.views.append(views)
                self.tails.append(tail)

    def _read_labels(self, run_dir: Path, shard: str, key: str,
                     members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        """An image's view records and, for v2 partial labels, its tail basis."""
        if LABELS_MEMBER in members:  # version 2: one member
            try:
                views, _, tail = decode_image_labels(members[LABELS_MEMBER])
            except ValueError as e:
                raise RunError(f"{run_dir}: {shard}: {key}.{LABELS_MEMBER}: {e}") from None
        elif "views.npy.zst" in members:  # version 1: views, then regions
            views, tail = decode_records(members["views.npy.zst"]), None
        else:
            raise RunError(f"{run_dir}: {shard}: no labels for {key}")
        if needs_tail(views):
            rank = views.dtype["coef"].shape[0] if views.dtype["coef"].shape else 1
            if tail is None or tail.shape != (rank, self.num_classes):
                raise RunError(f"{run_dir}: {shard}: {key} holds no tail basis of {rank} x {self.num_classes}")
        return views, tail

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def view_record(self, index: int) -> np.void:
        return self.views[index][self.epoch % self.num_views]

    def view_logits(self, index: int) -> np.ndarray:
        """The stored logits [1, C] of image `index`'s view for this epoch (v1 or v2 records)."""
        return unpack_logits(self.view_record(index)[None], self.num_classes, self.tails[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | int]:
        record = self.view_record(index)
        image = apply_view(decode_distilled(self.images[index]), stored_view(record), self.resolution)
        if self.label == "class":
            target = self.targets[index]
        else:
            target = torch.from_numpy(softmax(self.view_logits(index), self.temperature)[0])
        if self.normalize:
            image = IMAGENET(image)
        return image, target
