"""`rded eval`: train a student on a distilled run and report top-1 / top-5 on validation shards."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand

from .config import JobError, load_job
from .loader import DistilledDataset
from .shardio import write_bytes_atomic
from .train import Recipe, ValShards, default_batch_size, default_lr, evaluate, train_student


def expand_urls(patterns: list[str]) -> list[str]:
    urls = [u for p in patterns for u in braceexpand(p)]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise JobError(f"--val: shard not found: {', '.join(missing[:5])}")
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in the shards by their own headers, to report how many evaluation could not use."""
    from .source import scan_shard

    return sum(1 for i, u in enumerate(urls) for _ in scan_shard(i, Path(u)))


def online_teacher(run_dir: Path, job_path: str | None):
    """The observer as a function of a uint8 batch, from --job or (no weights file needed) the run's own job."""
    from .config import job_from_dict
    from .observer import build_observer, check_observer
    from .source import load_classes

    if job_path:
        job = load_job(job_path)
    else:
        manifest_job = json.loads((run_dir / "manifest.json").read_text())["job"]
        if manifest_job["observer"].get("weights") or manifest_job["data"].get("classes"):
            raise JobError("--teacher-online: pass --job JOB.toml so the observer's files can be found")
        job = job_from_dict(manifest_job, base_dir=run_dir)
    classes = load_classes(job)
    check_observer(job, classes)
    observer = build_observer(job, classes, torch.device("cpu"))

    def teacher(images: torch.Tensor) -> torch.Tensor:
        return observer.class_logits(observer.normalize(images))

    return teacher


def run_eval(args) -> dict[str, Any]:
    run_dir = Path(args.distilled)
    if not (run_dir / "manifest.json").is_file():
        raise JobError(f"--distilled {run_dir}: no manifest.json (not a finished rded run)")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    urls = expand_urls(args.val)
    labels = "online" if args.teacher_online else "hard" if args.hard_labels else "stored"
    resolution = args.resolution or manifest["job"]["distill"]["resolution"]
    train_set = DistilledDataset(run_dir, temperature=args.temperature, normalize=False, resolution=resolution,
                                 label="soft" if labels == "stored" else "class")
    num_classes = train_set.num_classes
    recipe = Recipe(student=args.student, epochs=args.epochs, resolution=resolution,
                    batch_size=args.batch_size or default_batch_size(manifest["ipc"], num_classes),
                    lr=args.lr or default_lr(args.student), temperature=args.temperature, schedule=args.schedule,
                    labels=labels, seed=args.seed, workers=args.workers)
    teacher = online_teacher(run_dir, args.job) if labels == "online" else None
    started = time.perf_counter()
    model = train_student(train_set, num_classes, recipe, teacher=teacher, progress=not args.quiet)
    trained = time.perf_counter() - started
    accuracy = evaluate(model, ValShards(urls, num_classes, resolution), workers=args.workers)
    in_shards = count_samples(urls)
    result = {
        "distilled": str(run_dir),
        "ipc": manifest["ipc"],
        "images": len(train_set),
        "classes": num_classes,
        "labels": labels,
        "recipe": asdict(recipe),
        "top1": round(accuracy.top1, 4),
        "top5": round(accuracy.top5, 4),
        "val_samples": accuracy.count,
        "val_skipped": in_shards - accuracy.count,
        "train_seconds": round(trained, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.out:
        write_bytes_atomic(Path(args.out), (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    print(json.dumps(result, sort_keys=True))
    print(f"rded eval: {recipe.student} on {run_dir} (IPC {result['ipc']}, {result['images']} images, "
          f"{labels} labels, {recipe.epochs} epochs at {resolution} px): top-1 {100 * accuracy.top1:.1f} %, "
          f"top-5 {100 * accuracy.top5:.1f} % on {accuracy.count} validation images; "
          f"{result['seconds']:.0f} s", file=sys.stderr)
    return result


def run_train_observer(args) -> dict[str, Any]:
    """Train a torchvision classifier on full training shards (cross-entropy), to serve as an observer."""
    from .train import TrainShards, build_student, save_student

    urls = expand_urls(args.train)
    try:
        build_student(args.arch, args.num_classes)
    except ValueError as e:
        raise JobError(f"--arch: {e}") from None
    recipe = Recipe(student=args.arch, epochs=args.epochs, resolution=args.resolution, batch_size=args.batch_size,
                    lr=args.lr or default_lr(args.arch), labels="hard", seed=args.seed, workers=args.workers)
    started = time.perf_counter()
    model = train_student(TrainShards(urls, args.num_classes, args.resolution, seed=args.seed), args.num_classes, recipe,
                          progress=not args.quiet)
    save_student(model, Path(args.out))
    result = {"weights": args.out, "arch": args.arch, "num_outputs": args.num_classes, "recipe": asdict(recipe),
              "train_seconds": round(time.perf_counter() - started, 1)}
    if args.val:
        acc = evaluate(model, ValShards(expand_urls(args.val), args.num_classes, args.resolution),
                       workers=args.workers)
        result.update(top1=round(acc.top1, 4), top5=round(acc.top5, 4), val_samples=acc.count)
    print(json.dumps(result, sort_keys=True))
    print(f"rded train-observer: wrote {args.out}; use it in a job file as\n"
          f'  [observer]\n  kind = "torchvision"\n  arch = "{args.arch}"\n  weights = "{args.out}"\n'
          f"  num_outputs = {args.num_classes}", file=sys.stderr)
    return result
