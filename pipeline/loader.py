"""What a user's own PyTorch training loop imports: distilled images with their stored soft labels.

    ds = DistilledDataset("out/ipc10", temperature=20.0)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                       # before the DataLoader starts its workers
        for images, soft_labels in DataLoader(ds, batch_size=50, shuffle=True, num_workers=2):
            ...

Item i at epoch e is image i after its stored view number e mod V (the exact view the observer labelled)
and the observer's probabilities for that view at the chosen temperature. Reads a full run or a slice.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import observer
from .labels import decode_records, softmax, unpack_logits
from .relabel import View, apply_view, decode_distilled

IMAGENET_MEAN = torch.tensor(observer.IMAGENET_MEAN).view(3, 1, 1)
IMAGENET_STD = torch.tensor(observer.IMAGENET_STD).view(3, 1, 1)


def read_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """A WebDataset shard's samples: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


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
        manifest = json.loads((run_dir / "manifest.json").read_text())
        if "labels" not in manifest:
            raise ValueError(f"{run_dir}: this run has no soft labels (relabel.enabled was false)")
        if label not in ("soft", "class"):
            raise ValueError(f"label must be 'soft' or 'class', not {label!r}")
        self.label = label
        self.resolution = resolution or manifest["job"]["distill"]["resolution"]
        self.num_classes = manifest["labels"]["classes"]
        self.num_views = manifest["labels"]["views"]
        if self.num_views < 1:
            raise ValueError(f"{run_dir}: the run stored no training views (relabel.views = 0)")
        self.temperature, self.normalize, self.epoch = temperature, normalize, epoch
        fmt = manifest["job"]["output"]["image_format"]
        self.keys: list[str] = []
        self.images: list[bytes] = []
        self.targets: list[int] = []
        self.views: list[np.ndarray] = []
        for shard in manifest["shards"]:
            images = read_samples(run_dir / shard["name"])
            labels = read_samples(run_dir / shard["labels"]["name"])
            for key, members in images.items():
                self.keys.append(key)
                self.images.append(members[fmt])
                self.targets.append(int(members["cls"]))
                self.views.append(decode_records(labels[key]["views.npy.zst"]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def view_record(self, index: int) -> np.void:
        return self.views[index][self.epoch % self.num_views]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | int]:
        record = self.view_record(index)
        image = apply_view(decode_distilled(self.images[index]), stored_view(record), self.resolution)
        if self.label == "class":
            target = self.targets[index]
        else:
            target = torch.from_numpy(softmax(unpack_logits(record[None], self.num_classes), self.temperature)[0])
        if self.normalize:
            image = (image.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return image, target
