"""Soft-label codecs at 1,000 classes: label bytes and fidelity of v1 and v2 (and variants) on real images.

    PYTHONPATH=<dir whose rded/ is pipeline/> OMP_NUM_THREADS=1 python benchmarks/label_codec_probe.py --images 30 --variants

(In this repository's checkouts: a directory holding a symlink `rded` -> `pipeline`; an installed package
works too.) About 40 s per image on one CPU core the first time (V = 300 views + 4 regions through the
observer), seconds afterwards.

Each probe image is what the product stitches at factor 2: four real ImageWoof train images of one class
(read from the shard with tarfile, nothing copied), each cut to the best of 5 of the product's candidate
crops (square, 8-100 % of the area, scored by the observer on the true class) resized to 112, stitched
2x2 into 224x224 and JPEG-encoded at q90. The product's relabeller (`Relabeler.exact`: V views + 4
regions, `pad` scoring at S = 224) labels it with EfficientNet-Lite0 and all 1,000 ImageNet outputs
(identity class map). The exact log-probabilities are
cached in /tmp, so codec variants compare in seconds on a rerun.

Label bytes are what an image's label member(s) take in a label shard (v2: one member; v1: two; tar
headers and padding included);
the ratio is against the JPEG as a tar member (the manifest's `bytes_ratio` divides by whole distilled
shards, whose samples also hold `.cls` and `.json`, so it comes out lower).
"""

from __future__ import annotations

import argparse
import io
import os
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
    from rded.runtime import ComputePolicy
    from rded.relabel import Relabeler
    from rded.score import Scorer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    observer = build_observer(None, None, ComputePolicy(torch.device("cpu")), ObserverConfig(kind="efficientnet-lite0"))
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


# -- codecs


def tar_bytes(*members: bytes) -> int:
    """What the members take in a label shard: a 512-byte header each, data padded to 512."""
    return sum(512 + -(-len(m) // 512) * 512 for m in members)


def shifted(lp: np.ndarray) -> np.ndarray:
    return lp.astype(np.float64) - lp.max(axis=1, keepdims=True)


def codec_v1(k: int):
    from rded.labels import encode_records, pack_labels, region_dtype, unpack_logits, view_dtype

    def run(views: np.ndarray, view_lp: np.ndarray, region_lp: np.ndarray):
        c = view_lp.shape[1]
        v1 = np.zeros(len(views), view_dtype(views.dtype["col_perm"].shape[0], c, k, version=1))
        v1["view"] = np.arange(len(views))
        for n in GEOMETRY:
            v1[n] = views[n]
        pack_labels(v1, view_lp)
        regions = np.zeros(len(region_lp), region_dtype(c, k, version=1))
        regions["cell"] = np.arange(len(region_lp))
        pack_labels(regions, region_lp)
        stored = np.concatenate([unpack_logits(v1, c), unpack_logits(regions, c)])
        return stored, tar_bytes(encode_records(v1), encode_records(regions))
    return run


GEOMETRY = ("col_perm", "row_perm", "crop", "flip")


def codec_v2(k: int, rank: int = 1, *, fit: bool = True, tail_from: str = "all"):
    """The product's v2 (defaults), or a variant: coefficients not fitted (the mean shape as it is), or
    the tail from the views alone."""
    from rded.labels import encode_image_labels, image_tail, pack_labels, region_dtype, unpack_logits, view_dtype

    def run(views: np.ndarray, view_lp: np.ndarray, region_lp: np.ndarray):
        c = view_lp.shape[1]
        tail = image_tail(view_lp, region_lp, rank=rank) if tail_from == "all" else image_tail(view_lp, rank=rank)
        vrec = np.zeros(len(views), view_dtype(views.dtype["col_perm"].shape[0], c, k, tail_rank=rank, resolution=224))
        for n in GEOMETRY:
            vrec[n] = views[n]
        regions = np.zeros(len(region_lp), region_dtype(c, k, tail_rank=rank))
        regions["cell"] = np.arange(len(region_lp))
        for rec, lp in ((vrec, view_lp), (regions, region_lp)):
            pack_labels(rec, lp, tail)
            if not fit:
                rec["coef"] = np.eye(1, rank + 1)
        stored = np.concatenate([unpack_logits(vrec, c, tail), unpack_logits(regions, c, tail)])
        return stored, tar_bytes(encode_image_labels(vrec, regions, tail))
    return run


def evaluate(codec, data) -> dict[str, float]:
    from rded.labels import kl_divergence

    kl1 = kl20 = count = label_bytes = 0.0
    for views, view_lp, region_lp in data:
        stored, nbytes = codec(views.copy(), view_lp, region_lp)
        exact = np.concatenate([view_lp, region_lp])
        kl1 += kl_divergence(stored, exact, 1.0).sum()
        kl20 += kl_divergence(stored, exact, 20.0).sum()
        count += len(exact)
        label_bytes += nbytes
    return {"bytes": label_bytes / len(data), "kl1": kl1 / count, "kl20": kl20 / count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--views", type=int, default=300)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/rded_label_probe"))
    ap.add_argument("--variants", action="store_true", help="also the variants tried (slower)")
    args = ap.parse_args()
    images, recs, vlps, rlps = exact_log_probs(args.images, args.views, args.cache)
    data = list(zip(recs, vlps, rlps))
    image_bytes = sum(tar_bytes(im) for im in images) / len(images)
    jpeg = sum(len(im) for im in images) / len(images)
    codecs = [("v1 (before), topk 16", codec_v1(16)), ("v1, topk 8", codec_v1(8)),
              ("v2, topk 6, tail_rank 1 (default)", codec_v2(6, 1))]
    if args.variants:
        codecs += [("v2, topk 8, tail_rank 0", codec_v2(8, 0)),
                   ("v2, topk 8, tail_rank 0, coef not fitted (mean shape as is)", codec_v2(8, 0, fit=False)),
                   ("v2, topk 8, tail_rank 0, tail from views only", codec_v2(8, 0, tail_from="views")),
                   ("v2, topk 6, tail_rank 0", codec_v2(6, 0)),
                   ("v2, topk 8, tail_rank 1", codec_v2(8, 1)),
                   ("v2, topk 4, tail_rank 2", codec_v2(4, 2)),
                   ("v2, topk 6, tail_rank 2", codec_v2(6, 2)),
                   ("v2, topk 16, tail_rank 1", codec_v2(16, 1))]
    print(f"{len(images)} images, V = {args.views} views + 4 regions, S = 224, 1000 classes; JPEG q90 "
          f"{jpeg:.0f} B/image ({image_bytes:.0f} B as a tar member)\n")
    print("| codec | label bytes/image | ratio to image | mean KL T=1 | mean KL T=20 |")
    print("|---|---:|---:|---:|---:|")
    for name, codec in codecs:
        r = evaluate(codec, data)
        print(f"| {name} | {r['bytes']:.0f} | {r['bytes'] / image_bytes:.3f} | {r['kl1']:.2e} | {r['kl20']:.2e} |",
              flush=True)


if __name__ == "__main__":
    main()
