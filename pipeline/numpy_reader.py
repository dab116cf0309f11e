"""A finished run read with numpy and Pillow alone, for training stacks without torch (or with another one):

    from rded.numpy_reader import RunArrays

    run = RunArrays("out/ipc10")
    for epoch in range(epochs):
        for i in range(len(run)):
            image = run.training_view(i, epoch)          # uint8 HWC: the view the observer labelled
            target = run.probabilities(i, epoch, temperature=20.0)   # float32 [C]
            view = run.view(i, epoch)                    # its parameters: grid permutations, crop, flip

Item i at epoch e is image i after its stored view number e mod V and the observer's probabilities for that
view, as rded.DistilledDataset gives them. The view is cut and resized with Pillow (bilinear, antialiased
when shrinking), which agrees with the torch resize the dataset uses to within one grey level
(tests/test_numpy_reader.py measures it). Every shard is checked against its sha256 in the manifest.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import RunError
from .grid import View, cell_boxes, stored_view
from .labels import LABELS_FORMAT, LABELS_FORMAT_V1, read_image_labels, softmax, unpack_logits
from .rundir import read_manifest, read_verified


class RunArrays:
    """A run's images, classes and stored view labels, in the manifest's shard order."""

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir)
        if manifest.labels is None:
            raise RunError(f"{run_dir}: this run has no soft labels (relabel.enabled was false)")
        if manifest.labels.get("format") not in (LABELS_FORMAT, LABELS_FORMAT_V1):
            raise RunError(f"{run_dir}: soft labels in format {manifest.labels.get('format')!r}; this version reads "
                           f"{LABELS_FORMAT_V1} and {LABELS_FORMAT}")
        self.run_dir, self.manifest = run_dir, manifest
        self.num_classes: int = manifest.labels["classes"]
        self.num_views: int = manifest.labels["views"]
        if self.num_views < 1:
            raise RunError(f"{run_dir}: the run stored no training views (relabel.views = 0)")
        self.keys: list[str] = []
        self.images: list[bytes] = []  # as stored (JPEG or PNG)
        self.targets: list[int] = []
        self.views: list[np.ndarray] = []
        self.tails: list[np.ndarray | None] = []  # partial labels: the image's tail shape
        for shard in manifest.shards:
            images = read_verified(run_dir, shard.name, shard.sha256)
            labels = read_verified(run_dir, shard.labels["name"], shard.labels["sha256"])
            for key, members in images.items():
                try:
                    views, tail = read_image_labels(labels.get(key, {}), self.num_classes)
                except ValueError as e:
                    raise RunError(f"{run_dir}: {shard.labels['name']}: {key}: {e}") from None
                self.keys.append(key)
                self.images.append(members[manifest.image_format])
                self.targets.append(int(members["cls"]))
                self.views.append(views)
                self.tails.append(tail)

    def __len__(self) -> int:
        return len(self.keys)

    def view_record(self, index: int, epoch: int) -> np.void:
        return self.views[index][epoch % self.num_views]

    def view(self, index: int, epoch: int) -> View:
        """The parameters of image `index`'s training view at `epoch`."""
        return stored_view(self.view_record(index, epoch))

    def logits(self, index: int, epoch: int) -> np.ndarray:
        """The stored log-probabilities [C] of that view."""
        return unpack_logits(self.view_record(index, epoch)[None], self.num_classes, self.tails[index])[0]

    def probabilities(self, index: int, epoch: int, temperature: float = 1.0) -> np.ndarray:
        """The observer's probabilities [C] for that view at `temperature` (float32)."""
        return softmax(self.logits(index, epoch)[None], temperature)[0].astype(np.float32)

    def image(self, index: int) -> np.ndarray:
        """The distilled image as stored: uint8 HWC RGB."""
        with Image.open(io.BytesIO(self.images[index])) as im:
            return np.asarray(im.convert("RGB"))

    def training_view(self, index: int, epoch: int, resolution: int | None = None) -> np.ndarray:
        """The view itself: uint8 HWC, `resolution` square (default: the run's S)."""
        return render_view(self.image(index), self.view(index, epoch), resolution or self.manifest.resolution)


def render_view(image: np.ndarray, view: View, resolution: int) -> np.ndarray:
    """A training view on an HWC uint8 image: the grid's column strips permuted, then its row strips, the
    crop resized to `resolution` (Pillow's bilinear, antialiased when shrinking), then the flip."""
    bounds = [(b[0], b[2]) for b in cell_boxes(image.shape[1], len(view.col_perm))[:len(view.col_perm)]]
    image = np.concatenate([image[:, bounds[c][0]:bounds[c][1]] for c in view.col_perm], axis=1)
    image = np.concatenate([image[bounds[r][0]:bounds[r][1]] for r in view.row_perm], axis=0)
    x, y, w, h = view.crop
    crop = image[y:y + h, x:x + w]
    if (h, w) != (resolution, resolution):
        crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((resolution, resolution),
                                                                             Image.Resampling.BILINEAR))
    return np.ascontiguousarray(crop[:, ::-1] if view.flip else crop)
