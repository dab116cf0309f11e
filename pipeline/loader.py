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

from .geometry import apply_view, decode_distilled
from .grid import stored_view  # noqa: F401 (part of this module's interface)
from .labels import softmax
from .normalization import IMAGENET
from .numpy_reader import RunArrays


class DistilledDataset(Dataset):
    """(image, soft label) pairs of a finished run or slice, for a given epoch.

    image: float32 CHW, ImageNet mean/std normalised (`normalize=False`: uint8 CHW as stored), of side
    `resolution` (default: the run's S; another size resizes the view's crop to it directly).
    label: float32 [C], softmax of the stored view logits at `temperature`; `label="class"` gives the
    class index instead (hard labels, or a teacher run online).
    """

    def __init__(self, run_dir: str | Path, *, epoch: int = 0, temperature: float = 1.0, normalize: bool = True,
                 resolution: int | None = None, label: str = "soft"):
        if label not in ("soft", "class"):
            raise ValueError(f"label must be 'soft' or 'class', not {label!r}")
        self.run = RunArrays(run_dir)  # the reading and checking, shared with the torch-free reader
        self.label = label
        self.ipc = self.run.manifest.ipc
        self.resolution = resolution or self.run.manifest.resolution
        self.num_classes, self.num_views = self.run.num_classes, self.run.num_views
        self.temperature, self.normalize, self.epoch = temperature, normalize, epoch
        self.keys, self.images, self.targets = self.run.keys, self.run.images, self.run.targets

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def view_record(self, index: int) -> np.void:
        return self.run.view_record(index, self.epoch)

    def view_logits(self, index: int) -> np.ndarray:
        """The stored logits [1, C] of image `index`'s view for this epoch (v1 or v2 records)."""
        return self.run.logits(index, self.epoch)[None]

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
