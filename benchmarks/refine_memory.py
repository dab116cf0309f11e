"""Peak memory and time of one refine iteration, by batch size (classes) and micro-batch size.

Each setting runs in a fresh process (so its peak resident memory is its own): EfficientNet-Lite0 with
all 1,000 ImageNet outputs, random stitched images at S, one optimisation step of a batch of C images
(one per class). Usage: python benchmarks/refine_memory.py [--size 224] [--settings 10:256,100:256,100:25,...]
Prints a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(classes: int, micro: int, size: int) -> dict:
    import numpy as np
    import torch

    from rded.config import ObserverConfig, RefineConfig
    from rded.normalization import LITE
    from rded.observer import REGISTRY, Observer
    from rded.refine import Refiner
    from rded.runtime import ComputePolicy

    torch.manual_seed(0)
    model = REGISTRY["efficientnet-lite0"].factory(ObserverConfig(kind="efficientnet-lite0"), None).eval()
    observer = Observer(model, LITE, torch.arange(classes), ComputePolicy(torch.device("cpu")))
    images = np.random.default_rng(0).integers(0, 256, (classes, size, size, 3), dtype=np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = RefineConfig(enabled=True, iterations=1, resolutions=[size], micro_batch=micro)
    started = time.perf_counter()
    Refiner(cfg, [observer], ["efficientnet-lite0"], seed=0, resolution=size).refine(images, list(range(classes)), 0)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"classes": classes, "micro_batch": micro, "size": size, "seconds_per_iteration": round(seconds, 2),
            "peak_rss_mib": round(peak), "rss_before_mib": round(before)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--settings", default="10:256,100:256,100:25,1000:100,1000:25")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        classes, micro = map(int, args.one.split(":"))
        print(json.dumps(one(classes, micro, args.size)))
        return
    print("| classes (batch) | micro-batch | forward passes per step | s per step | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for setting in args.settings.split(","):
        classes, micro = map(int, setting.split(":"))
        out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--one", setting],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {classes} | {micro} | — | failed: {out.stderr.strip().splitlines()[-1][:80]} | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        passes = 1 if micro >= classes else 2
        print(f"| {classes} | {micro} | {passes} | {r['seconds_per_iteration']} | {r['peak_rss_mib']} |", flush=True)


if __name__ == "__main__":
    main()
