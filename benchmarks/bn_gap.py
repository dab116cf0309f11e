"""How far refinement's BN term starts and ends from its target, beside real photos (docs/results.md,
"Refinement under the paper's recipe").

The BN term of `rded.refine` (FADRM's) is the distance between a batch's per-layer input statistics and a
target: the observer's running statistics (ImageNet's) or the data's own (`refine.bn_stats = "data"`, the
bn_stats.json a run measured). A refined batch is one image per class, so its term has a floor: the distance
of a batch of 10 real photos of the same data. This prints, per kind of batch, the term against both targets
(weighted as the refinement weights it: the first layer x first_bn_multiplier), in fp32 as refinement runs:
real photos (one per class, their centre square at the set's resolution, drawn with a seed), and each given
distilled set's batches (image index i of every class, as it was refined).

Usage: python benchmarks/bn_gap.py BN_STATS_JSON SET [SET ...] [--job jobs/imagewoof.toml] [--batches 10]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from rded.bnstats import DataStatistics
from rded.config import load_job
from rded.observer import build_observer
from rded.refine import BNTerm, bn_layers
from rded.runtime import ComputePolicy
from rded.source import load_classes


def set_batches(path: Path) -> tuple[int, list[np.ndarray]]:
    """A distilled set's images grouped as refinement batched them: image index i of every class."""
    by_index: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    size = 0
    for sample in wds.WebDataset(sorted(str(p) for p in path.glob("distilled-*.tar")), shardshuffle=False):
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        cls, index = (int(part) for part in sample["__key__"].split("_"))
        by_index[index][cls] = image
        size = image.shape[0]
    return size, [np.stack([images[c] for c in sorted(images)]) for _, images in sorted(by_index.items())]


def photo_batches(train: list[str], classes: int, size: int, batches: int, seed: int) -> list[np.ndarray]:
    """`batches` batches of one train photo per class (drawn with `seed`), each its centre square at `size`."""
    photos: dict[int, list[bytes]] = defaultdict(list)
    for sample in wds.WebDataset(train, shardshuffle=False):
        photos[int(sample["cls"])].append(sample["jpg"])
    rng = random.Random(seed)
    picks = {c: rng.sample(photos[c], batches) for c in range(classes)}

    def square(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))
    return [np.stack([square(picks[c][b]) for c in range(classes)]) for b in range(batches)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bn_stats", type=Path)
    parser.add_argument("sets", type=Path, nargs="+")
    parser.add_argument("--job", default="jobs/imagewoof.toml")
    parser.add_argument("--batches", type=int, default=10, help="batches of real photos")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    job = load_job(args.job)
    classes = load_classes(job)
    observer = build_observer(job, classes, ComputePolicy.resolve("cpu", "fp32"))
    layers = bn_layers(observer.model)
    stats = DataStatistics.from_bytes(args.bn_stats.read_bytes())
    assert stats is not None and len(stats.stats[0]) == len(layers), "bn_stats.json does not fit the observer"
    weights = [job.refine.first_bn_multiplier] + [1.0] * (len(layers) - 1)
    targets = {"ImageNet (running)": [None] * len(layers),
               "data": [(torch.from_numpy(m).float(), torch.from_numpy(v).float()) for m, v in stats.stats[0]]}

    def term(batch: np.ndarray, target: list) -> float:
        terms = [BNTerm(layer, w, t) for layer, w, t in zip(layers, weights, target)]
        for t in terms:
            t.mode = "direct"
        try:
            with torch.no_grad():
                observer.class_logits(observer.normalize(torch.from_numpy(batch).permute(0, 3, 1, 2)))
            return sum(t.weight * t.value.item() for t in terms)
        finally:
            for t in terms:
                t.remove()

    sets = {str(path): set_batches(path) for path in args.sets}
    size = next(iter(sets.values()))[0]
    kinds = {f"real photos, one per class ({args.batches} batches, seed {args.seed})":
             photo_batches([url for p in job.data.train for url in braceexpand(str(job.path(p)))], len(classes),
                           size, args.batches, args.seed)}
    kinds.update({path: batches for path, (_, batches) in sets.items()})
    print(f"BN term (sum over {len(layers)} layers, first x {weights[0]:g}), batches of {len(classes)} images "
          f"at {size} px, fp32: mean ± sd over batches")
    print("| batches | " + " | ".join(f"against {name}" for name in targets) + " |")
    print("|---" * (1 + len(targets)) + "|")
    for kind, batches in kinds.items():
        cells = []
        for target in targets.values():
            values = [term(b, target) for b in batches]
            cells.append(f"{statistics.fmean(values):.0f} ± {statistics.stdev(values):.0f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
