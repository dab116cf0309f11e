"""Fidelity of a bf16 run against an fp32 run of the same job (docs/performance.md, "bf16 against fp32").

    .venv/bin/python benchmarks/precision_fidelity.py JOB.toml FP32_RUN BF16_RUN [--label-images 10] [--out F.json]

Both runs must be of JOB (same overrides apart from runtime.precision). Reports, from the image shards'
provenance (every cell names its source patch, rank and score):
- the share of each class's winners (its top N x IPC patches) that both runs pick;
- per class, how far below the fp32 cut (its worst fp32 winner) the worst bf16 winner falls, with every bf16
  winner re-scored in fp32 (its patch cut again from the source image and run through the fp32 observer);
- the share of distilled cells (image, cell) that hold the same patch;
- |bf16 score - fp32 score| of every bf16 winner (median, p99, max);
- the mean KL between the bf16 run's stored view labels and the fp32 observer's exact labels of the same
  views, on the first image of each class (or --label-images images), at T = 1 and 20.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from rded.config import load_job
from rded.crops import Cutter, CutRequest
from rded.loader import DistilledDataset
from rded.labels import kl_divergence
from rded.observer import build_observer
from rded.relabel import Relabeler
from rded.runtime import ComputePolicy
from rded.score import Scorer
from rded.source import expand_shards, load_classes


def winners(run: Path) -> dict[tuple[int, int], dict]:
    """(class, rank) -> the cell's provenance {key, shard, crop_index, window, score, image, cell}."""
    out = {}
    for shard in sorted(run.glob("distilled-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    for cell in meta["cells"]:
                        out[(meta["class"], cell["rank"])] = {**cell["source"], "score": cell["score"],
                                                              "image": meta["image_index"], "cell": cell["cell"]}
    return out


def source_bytes(job, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """(shard file name, key) -> the encoded image, for the wanted samples."""
    found = {}
    for shard in expand_shards(job):
        name = Path(shard.path).name
        with tarfile.open(shard.path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if (name, key) in wanted and ext in ("jpg", "jpeg", "png", "webp"):
                    found[(name, key)] = tar.extractfile(m).read()
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("fp32_run", type=Path)
    ap.add_argument("bf16_run", type=Path)
    ap.add_argument("--label-images", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    job = load_job(args.job)
    cfg = job.distill
    fp32 = ComputePolicy(torch.device("cpu"), "fp32")
    observer = build_observer(job, load_classes(job), fp32)
    scorer = Scorer(observer, mode=cfg.score_mode, resolution=cfg.resolution, score_batch=job.runtime.score_batch,
                    decimals=7)
    a, b = winners(args.fp32_run), winners(args.bf16_run)
    classes = sorted({c for c, _ in a})

    # re-score every bf16 winner (and, as a check, every fp32 winner) in fp32
    items = sorted({(w["shard"], w["key"], w["crop_index"], tuple(w["window"]), tuple(w["image_size"]))
                    for w in (*a.values(), *b.values())})
    encoded = source_bytes(job, {(s, k) for s, k, *_ in items})
    cutter = Cutter(1, batch_size=32, num_threads=2, decoder="cpu", device_id=None)
    patches = cutter.cut([CutRequest(encoded[(s, k)], [win], [(cfg.patch_size,) * 2], size[0] * size[1])
                          for s, k, _, win, size in items])
    labels = {}
    for (c, _), w in (*a.items(), *b.items()):
        labels[(w["shard"], w["key"], w["crop_index"])] = c
    fp32_score = dict(zip([(s, k, ci) for s, k, ci, *_ in items],
                          scorer.score(np.stack([p[0] for p in patches]),
                                       np.array([labels[(s, k, ci)] for s, k, ci, *_ in items]))))

    def ident(w):
        return (w["shard"], w["key"], w["crop_index"])

    per_class = {}
    shared_total = 0
    for c in classes:
        wa = {ident(w) for (cc, _), w in a.items() if cc == c}
        wb = [w for (cc, _), w in b.items() if cc == c]
        cut = min(fp32_score[ident(w)] for (cc, _), w in a.items() if cc == c)
        worst_b = min(fp32_score[ident(w)] for w in wb)
        shared = sum(1 for w in wb if ident(w) in wa)
        shared_total += shared
        per_class[c] = {"winners": len(wb), "shared": shared, "fp32_cut": round(float(cut), 5),
                        "worst_bf16_winner_fp32": round(float(worst_b), 5),
                        "below_cut": round(float(max(0.0, cut - worst_b)), 5)}
    recheck = max(abs(fp32_score[ident(w)] - w["score"]) for w in a.values())
    cells_a = {(w["image"], c, w["cell"]): ident(w) for (c, _), w in a.items()}
    cells_b = {(w["image"], c, w["cell"]): ident(w) for (c, _), w in b.items()}
    same_cells = sum(1 for k, v in cells_b.items() if cells_a.get(k) == v)
    diffs = np.array([abs(w["score"] - fp32_score[ident(w)]) for w in b.values()])

    # labels: the bf16 run's stored view labels against the fp32 observer's exact ones, same images and views
    ds = DistilledDataset(args.bf16_run, normalize=False)
    relabeler = Relabeler(scorer, seed=cfg.seed, views=job.relabel.views, resolution=cfg.resolution,
                          factor=cfg.factor, topk=job.relabel.topk, exact_classes=job.relabel.exact_classes,
                          tail_rank=job.relabel.tail_rank)
    firsts = [i for i, k in enumerate(ds.keys) if k.endswith("_0000")][: args.label_images]
    kl = {1.0: [], 20.0: []}
    for i in firsts:
        _, exact_views, _ = relabeler.exact(ds.keys[i], ds.images[i])
        stored = []
        for v in range(job.relabel.views):
            ds.set_epoch(v)
            stored.append(ds.view_logits(i))
        stored = np.concatenate(stored)
        for t in kl:
            kl[t].extend(kl_divergence(exact_views, stored, t).tolist())

    result = {
        "winners": len(b), "shared_winners": shared_total, "shared_share": round(shared_total / len(b), 4),
        "classes_with_a_bf16_winner_over_0.01_below_the_fp32_cut":
            sum(1 for v in per_class.values() if v["below_cut"] > 0.01),
        "max_below_cut": max(v["below_cut"] for v in per_class.values()),
        "cells": len(cells_b), "identical_cells": same_cells, "identical_cell_share": round(same_cells / len(cells_b), 4),
        "score_diff": {"median": float(np.median(diffs)), "p99": float(np.quantile(diffs, 0.99)),
                       "max": float(diffs.max())},
        "fp32_rescore_check_max_abs": float(recheck),
        "labels": {"images": len(firsts), "views": job.relabel.views,
                   "mean_kl_t1": float(np.mean(kl[1.0])), "mean_kl_t20": float(np.mean(kl[20.0]))},
        "per_class": per_class,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
