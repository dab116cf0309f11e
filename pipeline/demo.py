"""`rded demo`: the whole job on built-in synthetic data, no data set or network needed.

Makes shapes-on-clutter shards, trains a small CNN observer for a fixed number of seeded steps (about a
minute on 2 cores), writes a real job file, runs the job at IPC 10 and slices it to IPC 1. Everything
lands in one folder the user can look at, and two demos on one machine give identical shards.
"""

from __future__ import annotations

import sys
import time

from .config import DemoConfig, load_job
from .distill import run_distill
from .rundir import slice_run
from .synthetic import save_weights, train_observer, write_synthetic_shards

NUM_CLASSES = 6
PER_CLASS = 120
RESOLUTION = 64

JOB = """\
# Written by `rded demo`: a job file like any other (paths are relative to this file).
[data]
train = "data/train-{{000000..000003}}.tar"
classes = "data/classes.json"

[distill]
ipc = 10
subset = 60
crops = 5
factor = 2
resolution = {resolution}
score_mode = "pad"
seed = {seed}

[observer]
kind = "small-cnn"
weights = "observer.pt"

[refine]
# FADRM refinement of the stitched images; turn it on with --set refine.enabled=true
enabled = false
iterations = 200
resolutions = [56, 64, 56, 64]
jitter = 8

[runtime]
progress = {progress}
"""


def log(msg: str) -> None:
    print(f"rded demo: {msg}", file=sys.stderr, flush=True)


def run_demo(cfg: DemoConfig) -> None:
    started = time.perf_counter()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    log(f"writing {NUM_CLASSES} classes x {PER_CLASS} synthetic images (shapes on clutter) to {out / 'data'}")
    write_synthetic_shards(out / "data", num_classes=NUM_CLASSES, per_class=PER_CLASS, num_shards=4, seed=cfg.seed)
    log(f"training a small CNN observer for {cfg.train_steps} steps")
    model = train_observer(NUM_CLASSES, resolution=RESOLUTION, factor=2, steps=cfg.train_steps, seed=cfg.seed, log=log)
    save_weights(model, out / "observer.pt")
    job_path = out / "job.toml"
    job_path.write_text(JOB.format(resolution=RESOLUTION, seed=cfg.seed,
                                   progress="true" if sys.stderr.isatty() else "false"))
    log(f"distilling with {job_path}")
    summary = run_distill(load_job(job_path), out / "ipc10", overwrite=True)
    log(summary.line())
    sliced = slice_run(out / "ipc10", 1, out / "ipc1", overwrite=True)
    log(f"sliced IPC 1 from it: {sliced.images} images, no recomputation")
    rows = [(out / "ipc10" / "contact-sheet.png", "the distilled images, a row per class"),
            (out / "ipc10" / "distilled-*.tar", "distilled shards (image, .cls, .json provenance)"),
            (out / "ipc10" / "labels-*.tar", "soft labels: 300 training views and 4 regions per image"),
            (out / "ipc10" / "manifest.json", "config, versions, per-class counts, sha256 of every shard"),
            (out / "ipc10" / "report.json", "stage timings; every input sample accounted for"),
            (out / "ipc1", "the IPC 1 slice"),
            (job_path, "the job file")]
    width = max(len(str(path)) for path, _ in rows)
    print(f"\nrded demo finished in {time.perf_counter() - started:.0f} s. Look at:")
    for path, what in rows:
        print(f"  {str(path):<{width}}  {what}")
    print(f"Rerun the job with: rded distill {job_path} --out {out / 'ipc10'} --overwrite")
