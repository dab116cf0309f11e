"""`rded eval`: train a student on a distilled run and report top-1 / top-5 on validation shards; and
`rded train-observer`: train a classifier on full shards to serve as an observer."""

from __future__ import annotations

import hashlib
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
from .keyed import keyed_u64
from .records import SampleRef
from .rundir import Manifest, read_manifest, write_json
from .runtime import ComputePolicy, resolve_devices
from .source import load_classes, scan_shard
from .train import (Accuracy, EpochLog, Recipe, TrainingCheckpoint, TrainShards, ValShards, build_student,
                    default_batch_size, default_lr, evaluate, save_student, train_student)


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


def manifest_digest(run_dir: Path) -> str:
    """The run's identity: its manifest pins every shard by sha256."""
    return hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest()


def best_of_subset(urls: list[str], num_classes: int, per_class: int, seed: int) -> list[str]:
    """The authors' best-of validation subset: `per_class` samples of each class, those whose keyed hash of
    (seed, key) is smallest; a pure function of the seed and the keys, whatever the shard order. Sorted."""
    by_class: dict[int, list[tuple[int, str]]] = {}
    for i, u in enumerate(urls):
        for ref in scan_shard(i, Path(u)):
            if isinstance(ref, SampleRef) and 0 <= ref.label < num_classes:
                by_class.setdefault(ref.label, []).append((keyed_u64(seed, "best-of", ref.key), ref.key))
    return sorted(key for members in by_class.values() for _, key in sorted(members)[:per_class])


def best_of_checks(epochs: int, every: int = 10, last: float = 0.2) -> list[int]:
    """Epochs (1-based) checked for best-of: every `every` in the last `last` of training, and the last."""
    return sorted({e for e in range(1, epochs + 1) if e % every == 0 and e > (1 - last) * epochs} | {epochs})


def eval_recipe(cfg: EvalConfig, manifest: Manifest, resolution: int, num_classes: int) -> Recipe:
    """The training recipe: the command's settings, the authors' defaults for the rest."""
    # the authors' batch size goes by the classes the set has: 10 of an observer's 1,000 are still 10
    present = sum(1 for c in manifest.classes if c.images) or num_classes
    return Recipe(student=cfg.student, epochs=cfg.epochs, resolution=resolution,
                  batch_size=cfg.batch_size or default_batch_size(manifest.ipc, present),
                  lr=cfg.lr or default_lr(cfg.student), temperature=cfg.temperature, schedule=cfg.schedule,
                  labels=cfg.labels, seed=cfg.seed, workers=cfg.workers)


def open_checkpoint(cfg: EvalConfig, recipe: Recipe, compute: ComputePolicy, subset: list[str],
                    urls: list[str]) -> tuple[TrainingCheckpoint | None, dict | None]:
    """The training's checkpoint (None without --checkpoint or --out) and, with --resume, its saved state."""
    if not cfg.checkpoint_path:
        if cfg.resume:
            raise OptionError("resume", "needs a checkpoint: give --checkpoint or --out")
        return None, None
    # the same data (the manifest pins every shard's digest), recipe, precision and best-of subset
    # (not the workers: training is the same for any number)
    identity = {"distilled": manifest_digest(cfg.distilled),
                "recipe": {k: v for k, v in asdict(recipe).items() if k != "workers"}, "compute": compute.record(),
                "best_of_keys": subset, "val": [Path(u).name for u in urls]}
    checkpoint = TrainingCheckpoint(cfg.checkpoint_path, identity, every=cfg.checkpoint_every,
                                    extra={"checks": {}, "train_seconds": 0.0})
    if cfg.checkpoint_path.exists() and not cfg.resume:
        raise OptionError("checkpoint", f"{cfg.checkpoint_path} exists: pass --resume to continue that training, "
                                        f"or delete it to start over")
    return checkpoint, checkpoint.load() if cfg.resume else None


def best_of_result(cfg: EvalConfig, record: dict[str, Any], checks: list[int], subset: list[str]) -> dict[str, Any]:
    """The authors' best-of protocol's figure, with every check it chose from."""
    best_epoch = max(checks, key=lambda e: (record["checks"][str(e)], e))
    return {
        "protocol": f"the best top-1 among checks every 10 epochs in the last 20 % of training (and the last), "
                    f"on {cfg.best_of_per_class} val images per class drawn with the seed (the authors')",
        "top1": round(record["checks"][str(best_epoch)], 4),
        "epoch": best_epoch,
        "checks": {e: round(record["checks"][str(e)], 4) for e in checks},
        "per_class": cfg.best_of_per_class,
        "seed": cfg.seed,
        "keys": subset,
    }


def report_eval(cfg: EvalConfig, result: dict[str, Any], accuracy: Accuracy, resolution: int) -> None:
    """The result as JSON (stdout, and --out) and one line for people (stderr)."""
    if cfg.out:
        write_json(cfg.out, result)
    print(json.dumps(result, sort_keys=True))
    best = result.get("best_of")
    best_text = (f"; best-of {100 * best['top1']:.1f} % (epoch {best['epoch']}, {len(best['keys'])} images)"
                 if best else "")
    print(f"rded eval: {cfg.student} on {cfg.distilled} (IPC {result['ipc']}, {result['images']} images, "
          f"{cfg.labels} labels, {cfg.epochs} epochs at {resolution} px, {result['compute']['precision']}): "
          f"top-1 {100 * accuracy.top1:.1f} %, top-5 {100 * accuracy.top5:.1f} % on {accuracy.count} "
          f"validation images{best_text}; {result['seconds']:.0f} s", file=sys.stderr)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    manifest = read_manifest(cfg.distilled)
    urls = expand_urls("val", cfg.val)
    resolution = cfg.resolution or manifest.resolution
    train_set = DistilledDataset(cfg.distilled, temperature=cfg.temperature, normalize=False, resolution=resolution,
                                 label="soft" if cfg.labels == "stored" else "class")
    num_classes = train_set.num_classes
    recipe = eval_recipe(cfg, manifest, resolution, num_classes)
    compute = compute_policy(cfg.device, cfg.precision)
    teacher = (online_teacher(cfg.distilled, cfg.teacher_job, manifest.job, compute) if cfg.labels == "online"
               else None)
    subset = best_of_subset(urls, num_classes, cfg.best_of_per_class, cfg.seed) if cfg.best_of_per_class else []
    checks = best_of_checks(recipe.epochs) if subset else []
    checkpoint, state = open_checkpoint(cfg, recipe, compute, subset, urls)
    record = checkpoint.extra if checkpoint else {"checks": {}, "train_seconds": 0.0}
    subset_val = ValShards(urls, num_classes, resolution, keys=subset)

    def check(log: EpochLog, model: torch.nn.Module) -> None:
        record["train_seconds"] += log.seconds
        if log.epoch + 1 in checks:
            record["checks"][str(log.epoch + 1)] = evaluate(model, subset_val, workers=cfg.workers,
                                                             compute=compute).top1

    started = time.perf_counter()
    model = train_student(train_set, num_classes, recipe, compute=compute, teacher=teacher, progress=cfg.progress,
                          on_epoch=check, checkpoint=checkpoint, resume=state)
    accuracy = evaluate(model, ValShards(urls, num_classes, resolution), workers=cfg.workers, compute=compute)
    result = {
        "distilled": str(cfg.distilled),
        "val": urls,
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
        "train_seconds": round(record["train_seconds"], 1),
        "resumed_at_epoch": state["epoch"] if state else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if subset:
        result["best_of"] = best_of_result(cfg, record, checks, subset)
    report_eval(cfg, result, accuracy, resolution)
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

