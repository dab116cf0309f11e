"""`rded eval`: train a student on a distilled run and report top-1 / top-5 on validation shards; and
`rded train-observer`: train a classifier on full shards to serve as an observer."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand

from .config import EvalConfig, TrainObserverConfig, job_from_dict, load_job
from .errors import OptionError
from .loader import DistilledDataset
from .observer import build_observer, check_observer
from .rundir import read_manifest, write_json
from .runtime import ComputePolicy, resolve_devices
from .source import load_classes, scan_shard
from .train import (Recipe, TrainShards, ValShards, build_student, default_batch_size, default_lr, evaluate,
                    save_student, train_student)


def expand_urls(option: str, patterns: list[str]) -> list[str]:
    urls = [u for p in patterns for u in braceexpand(p)]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise OptionError(option, f"shard not found: {', '.join(missing[:5])}")
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in the shards by their own headers, to report how many evaluation could not use."""
    return sum(1 for i, u in enumerate(urls) for _ in scan_shard(i, Path(u)))


def compute_policy(device: str, precision: str) -> ComputePolicy:
    """The device and precision of a command's model calls (`--device`, `--precision`)."""
    return ComputePolicy.resolve(resolve_devices(device, "auto")[0], precision)


def online_teacher(run_dir: Path, job_path: Path | None, manifest_job: dict[str, Any], compute: ComputePolicy):
    """The observer as a function of a uint8 batch, from the teacher's job file or (when the observer
    needs no files) the run's own job; it runs under the student's policy."""
    if job_path:
        job = load_job(job_path)
    else:
        if manifest_job["observer"].get("weights") or manifest_job["data"].get("classes"):
            raise OptionError("teacher_job", "the observer's files cannot be found from the run alone: "
                                             "give the job file it was distilled with")
        job = job_from_dict(manifest_job, base_dir=run_dir)
    classes = load_classes(job)
    check_observer(job, classes)
    observer = build_observer(job, classes, compute)

    def teacher(images: torch.Tensor) -> torch.Tensor:
        return observer.class_logits(observer.normalize(images))

    return teacher


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    manifest = read_manifest(cfg.distilled)
    urls = expand_urls("val", cfg.val)
    resolution = cfg.resolution or manifest.resolution
    train_set = DistilledDataset(cfg.distilled, temperature=cfg.temperature, normalize=False, resolution=resolution,
                                 label="soft" if cfg.labels == "stored" else "class")
    num_classes = train_set.num_classes
    # the authors' batch size goes by the classes the set has: 10 of an observer's 1,000 are still 10
    present = sum(1 for c in manifest.classes if c.images) or num_classes
    recipe = Recipe(student=cfg.student, epochs=cfg.epochs, resolution=resolution,
                    batch_size=cfg.batch_size or default_batch_size(manifest.ipc, present),
                    lr=cfg.lr or default_lr(cfg.student), temperature=cfg.temperature, schedule=cfg.schedule,
                    labels=cfg.labels, seed=cfg.seed, workers=cfg.workers)
    compute = compute_policy(cfg.device, cfg.precision)
    teacher = (online_teacher(cfg.distilled, cfg.teacher_job, manifest.job, compute) if cfg.labels == "online"
               else None)
    started = time.perf_counter()
    model = train_student(train_set, num_classes, recipe, compute=compute, teacher=teacher, progress=cfg.progress)
    trained = time.perf_counter() - started
    accuracy = evaluate(model, ValShards(urls, num_classes, resolution), workers=cfg.workers, compute=compute)
    result = {
        "distilled": str(cfg.distilled),
        "ipc": manifest.ipc,
        "images": len(train_set),
        "classes": num_classes,
        "labels": cfg.labels,
        "recipe": asdict(recipe),
        "compute": compute.record(),
        "top1": round(accuracy.top1, 4),
        "top5": round(accuracy.top5, 4),
        "val_samples": accuracy.count,
        "val_skipped": count_samples(urls) - accuracy.count,
        "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cfg.out:
        write_json(cfg.out, result)
    print(json.dumps(result, sort_keys=True))
    print(f"rded eval: {recipe.student} on {cfg.distilled} (IPC {result['ipc']}, {result['images']} images, "
          f"{cfg.labels} labels, {recipe.epochs} epochs at {resolution} px, {compute.precision}): top-1 {100 * accuracy.top1:.1f} %, "
          f"top-5 {100 * accuracy.top5:.1f} % on {accuracy.count} validation images; "
          f"{result['seconds']:.0f} s", file=sys.stderr)
    return result


def run_train_observer(cfg: TrainObserverConfig) -> dict[str, Any]:
    """Train a torchvision classifier on full training shards (cross-entropy), to serve as an observer."""
    urls = expand_urls("train", cfg.train)
    val_urls = expand_urls("val", cfg.val) if cfg.val else None
    try:
        build_student(cfg.arch, cfg.num_classes)
    except ValueError as e:
        raise OptionError("arch", str(e)) from None
    recipe = Recipe(student=cfg.arch, epochs=cfg.epochs, resolution=cfg.resolution, batch_size=cfg.batch_size,
                    lr=cfg.lr or default_lr(cfg.arch), labels="hard", seed=cfg.seed, workers=cfg.workers)
    compute = compute_policy(cfg.device, cfg.precision)
    started = time.perf_counter()
    model = train_student(TrainShards(urls, cfg.num_classes, cfg.resolution, seed=cfg.seed), cfg.num_classes,
                          recipe, compute=compute, progress=cfg.progress)
    save_student(model, cfg.out)
    result = {"weights": str(cfg.out), "arch": cfg.arch, "num_outputs": cfg.num_classes, "recipe": asdict(recipe),
              "compute": compute.record(), "train_seconds": round(time.perf_counter() - started, 1)}
    if val_urls:
        acc = evaluate(model, ValShards(val_urls, cfg.num_classes, cfg.resolution), workers=cfg.workers,
                       compute=compute)
        result.update(top1=round(acc.top1, 4), top5=round(acc.top5, 4), val_samples=acc.count)
    print(json.dumps(result, sort_keys=True))
    print(f"rded train-observer: wrote {cfg.out}; use it in a job file as\n"
          f'  [observer]\n  kind = "torchvision"\n  arch = "{cfg.arch}"\n  weights = "{cfg.out}"\n'
          f"  num_outputs = {cfg.num_classes}", file=sys.stderr)
    return result

