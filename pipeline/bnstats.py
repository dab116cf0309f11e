"""The data's own BN statistics for refinement (`refine.bn_stats = "data"`).

FADRM matches each BN layer's batch statistics to those the observer learnt, and the authors' observers
were trained on the target data, so those statistics were the data's. An ImageNet observer's running
statistics are ImageNet's: here they can be replaced, per observer and BN layer, by the channel means
and population variances of the layer's input measured over a sample of the job's own train images.

The sample is the first `refine.bn_stats_images` drawn samples in the keyed draw order
(rded.records.draw_order, a pure function of (seed, key)): the same whatever the shard order, batch size
or rank count. Each image is measured exactly as BNTerm measures a refined batch (its `accumulate` mode:
float64 sums over N, H, W, the variance biased), in eval mode and under the refinement's precision policy,
in forward passes of `refine.micro_batch` images in draw order. The statistics are written once per run
(a checkpoint unit; a resumed run takes them as they are) as JSON whose floats read back exactly.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .crops import Cutter
from .errors import JobError
from .keyed import centre_square
from .records import SampleRef, draw_order
from .refine import BNTerm, Refiner
from .rundir import BN_STATS
from .score import cut_candidates

FILE = BN_STATS  # the checkpoint unit, published beside the manifest
FORMAT = "rded-bn-stats/1"

LayerStats = tuple[np.ndarray, np.ndarray]  # per-channel mean and variance, float64


def first_drawn(parts: Iterable[Iterable[SampleRef]], seed: int, n: int) -> list[SampleRef]:
    """The first `n` samples of all `parts` in the keyed draw order (each part may already be cut to its own
    first n: the first n of a union are among the parts' first n)."""
    return heapq.nsmallest(n, (r for part in parts for r in part), key=lambda r: draw_order(seed, r))


@dataclass
class DataStatistics:
    images: int  # sampled images measured (those that decoded)
    sampled: int  # images in the sample
    resolution: int  # the side they were measured at
    observers: list[str]
    layers: list[list[str]]  # per observer, its BN layers' module names
    stats: list[list[LayerStats]]  # per observer and layer

    def to_bytes(self) -> bytes:
        """JSON; floats as Python writes them (the shortest text that reads back to the same float64)."""
        return json.dumps({
            "format": FORMAT, "images": self.images, "sampled": self.sampled, "resolution": self.resolution,
            "observers": [{"name": name, "layers": [{"name": layer, "mean": m.tolist(), "var": v.tolist()}
                                                    for layer, (m, v) in zip(layers, stats)]}
                          for name, layers, stats in zip(self.observers, self.layers, self.stats)]}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DataStatistics | None:
        """The recorded statistics, or None when the bytes are not a whole record (it is then measured again)."""
        try:
            doc = json.loads(data)
            if doc["format"] != FORMAT:
                return None
            observers = doc["observers"]
            return cls(int(doc["images"]), int(doc["sampled"]), int(doc["resolution"]),
                       [o["name"] for o in observers], [[layer["name"] for layer in o["layers"]] for o in observers],
                       [[(np.asarray(layer["mean"], np.float64), np.asarray(layer["var"], np.float64))
                         for layer in o["layers"]] for o in observers])
        except (ValueError, KeyError, TypeError):
            return None

    def summary(self, sha256: str) -> dict:
        """What the manifest records: the sample, the layers and the file's digest."""
        return {"source": "data", "images": self.images, "sampled": self.sampled, "resolution": self.resolution,
                "file": FILE, "sha256": sha256,
                "observers": [{"name": name, "layers": layers} for name, layers in zip(self.observers, self.layers)]}


def measure(refiner: Refiner, sample: Sequence[SampleRef], read: Callable[[SampleRef], bytes], cutter: Cutter, *,
            seed: int, max_pixels: int) -> DataStatistics:
    """The BN-layer input statistics of every refine observer over the sampled images (in sample order).

    Each image is its centre square resized to the last refine stage's side: refinement feeds the observer
    square images, each stitched from undistorted square crops, at the stage's side, and the last stage
    makes the image kept; so a real image is seen square (not squashed) at that side. It goes through the
    same decode and resize (DALI, antialiased) as the stitched patches, and each observer's normalisation."""
    cfg = refiner.cfg
    size = cfg.resolutions[-1]
    terms = [[BNTerm(m, 1.0) for m in layers] for layers in refiner.layers]
    for t in (t for ts in terms for t in ts):
        t.start_accumulating()
    used = 0
    threads = torch.get_num_threads()
    # one thread: a parallel sum's order (so its last bits, so the refined pixels) would follow the thread count,
    # which differs between a single process and torchrun's ranks; a few seconds for 512 images at 224 px
    torch.set_num_threads(1)
    try:
        with torch.no_grad():  # observers are built in eval mode (rded.observer): BN never updates its statistics
            for start in range(0, len(sample), cfg.micro_batch):  # fixed chunks: independent of runtime.batch_size
                candidates, _ = cut_candidates(sample[start:start + cfg.micro_batch], read, cutter, seed=seed,
                                               crops=1, patch_size=size, window=centre_square, max_pixels=max_pixels)
                if not candidates.images:
                    continue
                x = torch.from_numpy(np.stack([patches[0] for patches in candidates.patches])).permute(0, 3, 1, 2)
                for obs in refiner.observers:
                    obs.class_logits(obs.normalize(x.to(obs.device)))  # under the observer's precision policy
                used += len(candidates.images)
    finally:
        torch.set_num_threads(threads)
        for t in (t for ts in terms for t in ts):
            t.remove()
    if not used:
        raise JobError(f"refine.bn_stats = 'data': none of the {len(sample)} sampled images could be decoded")
    return DataStatistics(used, len(sample), size, list(refiner.names), refiner.layer_names(),
                          [[t.statistics() for t in ts] for ts in terms])
