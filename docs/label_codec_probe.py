"""Soft-label codecs at 1,000 classes: label bytes and fidelity of v1 and v2 (and variants) on real images.

    PYTHONPATH=. python docs/label_codec_probe.py --images 24 --views 300

Each probe image is what the product stitches at factor 2: four real ImageWoof train images of one class
(read from the shard with tarfile, nothing copied), each cut to the best of 5 of the product's candidate
crops (square, 8-100 % of the area, scored by the observer on the true class) resized to 112, stitched
2x2 into 224x224 and JPEG-encoded at q90. The
product's relabeller (`Relabeler.exact`: V views + 4 regions, `pad` scoring at S = 224) labels it with
EfficientNet-Lite0 and all 1,000 ImageNet outputs (identity class map). The exact log-probabilities are
cached in /tmp, so codec variants compare in seconds on a rerun.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
import time
from pathlib import Path

import numpy as np

SHARD = "/work/shared/data/imagewoof/train-000000.tar"


def stitched_images(n: int, scorer, crops: int = 5) -> list[bytes]:
    """n images as the product stitches them at factor 2: per cell, one real image of the class, its best
    of `crops` candidate crops (the product's `crop_window`: square, 8-100 % of the area) by the
    observer's log-probability of the true class, resized to 112; JPEG q90."""
    import json

    import torch
    from PIL import Image

    from rded.keyed import crop_window

    imagenet = {c["index"]: c["imagenet_index"] for c in json.loads(Path(SHARD).with_name("classes.json").read_text())}
    by_class: dict[int, list[tuple[str, bytes]]] = {}
    with tarfile.open(SHARD) as tar:
        members = {}
        for m in tar:
            key, ext = m.name.rsplit(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    for key, mem in members.items():
        if "jpg" in mem and "cls" in mem:
            by_class.setdefault(int(mem["cls"]), []).append((key, mem["jpg"]))
    cells = []  # per image and cell: its candidate patches
    for i in range(n):
        c = i % len(by_class)
        for cell in range(4):
            key, data = by_class[c][4 * (i // len(by_class)) + cell]
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                patches = []
                for j in range(crops):
                    x, y, w, h = crop_window(0, key, j, *im.size)
                    patches.append(im.crop((x, y, x + w, y + h)).resize((112, 112), Image.BILINEAR, reducing_gap=None))
            cells.append((c, patches))
    lp = scorer.log_probs(torch.stack([torch.from_numpy(np.asarray(p).copy()) for _, ps in cells for p in ps]))
    out = []
    for i in range(n):
        canvas = Image.new("RGB", (224, 224))
        for cell in range(4):
            c, patches = cells[4 * i + cell]
            first = (4 * i + cell) * crops
            best = int(lp[first:first + crops, imagenet[c]].argmax())
            canvas.paste(patches[best], (112 * (cell % 2), 112 * (cell // 2)))
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def exact_log_probs(n: int, views: int, cache: Path) -> tuple[list[bytes], list[np.ndarray], list[np.ndarray],
                                                               list[np.ndarray]]:
    """Per image: encoded bytes, view records (geometry), view log-probs [V, C], region log-probs [4, C]."""
    import torch

    from rded.config import ObserverConfig
    from rded.observer import build_observer
    from rded.relabel import Relabeler
    from rded.score import Scorer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    observer = build_observer(None, None, torch.device("cpu"), ObserverConfig(kind="efficientnet-lite0"))
    scorer = Scorer(observer, mode="pad", resolution=224, score_batch=32, decimals=4)
    relabeler = Relabeler(scorer, seed=0, views=views, resolution=224, factor=2, topk=16)
    images = stitched_images(n, scorer)
    cache.mkdir(parents=True, exist_ok=True)
    recs, vlps, rlps = [], [], []
    t0 = time.perf_counter()
    for i, encoded in enumerate(images):
        key = f"{i:05d}_0000"
        path = cache / f"{key}_v{views}.npz"
        if path.exists():
            z = np.load(path)
            vlp, rlp = z["views"], z["regions"]
            rec = relabeler.view_records(key)
        else:
            rec, vlp, rlp = relabeler.exact(key, encoded)
            np.savez(path, views=vlp, regions=rlp)
            print(f"  image {i + 1}/{n}: {time.perf_counter() - t0:.0f} s", flush=True)
        recs.append(rec)
        vlps.append(vlp)
        rlps.append(rlp)
    return images, recs, vlps, rlps
