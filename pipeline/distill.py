"""The distillation job: source -> select -> decode + crop -> score -> heap -> write.

Everything that can be wrong with the job is checked before work starts (JobError, exit code 2). All
outputs are made in a staging folder inside the output directory and moved into place at the end,
manifest.json last: a directory with a manifest is a finished run.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .config import JobConfig, JobError
from .crops import Cutter, centre_square, crop_window
from .heap import PerClassTopK, ScoredPatch, best_first
from .labels import LABELS_FORMAT
from .observer import build_observer, check_observer
from .relabel import Relabeler
from .dist import Ranks, from_environment, shutdown
from .report import DISTILLED, SCORED, SKIPPED, Ledger, Timings, concat_ledgers, merge_accounting, peak_rss_mib
from .score import Scorer, score_key_patches
from .select import draw_order, index_and_draw
from .shardio import read_member
from .source import expand_shards, load_classes
from .write import (MANIFEST_FORMAT, WriteSettings, merge_results, plan_images, remove_previous_run,
                    write_contact_sheet, write_distilled, write_json)

STAGING = ".rded-staging"
OUTPUT_FILES = ("manifest.json", "report.json", "samples.tsv", "contact-sheet.png")


def log(msg: str) -> None:
    print(f"rded: {msg}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import PIL
    import torchvision
    from nvidia import dali

    return {"rded": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "nvidia-dali": dali.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def resolve_devices(job: JobConfig) -> tuple[torch.device, str]:
    want = job.runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise JobError("runtime.device = 'cuda' but CUDA is not available on this machine")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    decoder = job.runtime.decoder
    if decoder == "auto":
        decoder = "mixed" if device.type == "cuda" else "cpu"
    if decoder == "mixed" and device.type != "cuda":
        raise JobError("runtime.decoder = 'mixed' needs CUDA")
    return device, decoder


def check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise JobError(f"--out {out_dir}: exists and is not a directory")
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise JobError(f"--out {out_dir}: holds a finished run (manifest.json); pass --overwrite to replace it")


def make_staging(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / STAGING
    if staging.exists():  # left by a crashed run
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def publish(staging: Path, out_dir: Path) -> None:
    """Replace any previous run's outputs with the staged ones, manifest.json last."""
    remove_previous_run(out_dir)
    for name in OUTPUT_FILES:
        if name != "manifest.json":
            (out_dir / name).unlink(missing_ok=True)
    for item in sorted(staging.iterdir()):
        if item.name != "manifest.json":
            item.replace(out_dir / item.name)
    (staging / "manifest.json").replace(out_dir / "manifest.json")
    staging.rmdir()


def progress_bar(job: JobConfig, total: int, what: str, ranks: Ranks) -> tqdm:
    """Images/s on stderr (the main rank's share when there are several); in logs (not a terminal) a
    line every 15 s instead of a live bar."""
    return tqdm(total=total, unit="img", desc=f"rded: {what}", disable=not job.runtime.progress or not ranks.is_main,
                mininterval=0.5 if sys.stderr.isatty() else 15.0, file=sys.stderr)


def labels_summary(job: JobConfig, result, num_classes: int) -> dict[str, Any]:
    image_bytes = sum(s.bytes for s in result.shards)
    label_bytes = sum(s.labels["bytes"] for s in result.shards)
    n = max(result.labels_counted, 1)
    return {
        "format": LABELS_FORMAT,
        "views": job.relabel.views,
        "regions": job.distill.patches_per_image,
        "classes": num_classes,
        "topk": min(job.relabel.topk, num_classes),
        "bytes": label_bytes,
        "image_bytes": image_bytes,
        "bytes_ratio": round(label_bytes / image_bytes, 4) if image_bytes else None,
        # fidelity of the stored labels: mean KL(stored || exact) over every view and region, in nats
        "mean_kl_t1": float(f"{result.kl_sums.get(1.0, 0.0) / n:.3e}"),
        "mean_kl_t20": float(f"{result.kl_sums.get(20.0, 0.0) / n:.3e}"),
    }


@dataclass
class Summary:
    out_dir: Path
    images: int
    shards: int
    classes: int
    scored_images: int
    skipped: int
    seconds: float

    def line(self) -> str:
        rate = self.scored_images / self.seconds if self.seconds else 0.0
        return (f"{self.images} distilled images ({self.classes} classes, {self.shards} shards) from "
                f"{self.scored_images} scored source images in {self.seconds:.1f} s ({rate:.1f} images/s); "
                f"{self.skipped} samples skipped; output: {self.out_dir}")


def run_distill(job: JobConfig, out_dir: Path, *, overwrite: bool = False) -> Summary:
    """Run a job, in this process or as one rank of a torchrun launch (detected from the environment)."""
    started = time.perf_counter()
    # -- checks: every failure here is a JobError before any work (on every rank alike)
    shards = expand_shards(job)
    classes = load_classes(job)
    check_observer(job, classes)
    device, decoder = resolve_devices(job)
    check_output(out_dir, overwrite)
    ranks = from_environment(len(shards), use_cuda=device.type == "cuda")
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    staging = out_dir / STAGING
    try:
        if ranks.is_main:
            make_staging(out_dir)
        ranks.barrier()
        return _run(job, out_dir, staging, shards, classes, device, decoder, ranks, started)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-made stays behind
        raise
    finally:
        shutdown(ranks)


def _run(job: JobConfig, out_dir: Path, staging: Path, shards, classes, device: torch.device, decoder: str,
         ranks: Ranks, started: float) -> Summary:
    cfg = job.distill
    timings = Timings()
    with timings.stage("observer_load", items=1, unit="models"):
        observer = build_observer(job, classes, device)
    num_classes = len(observer.output_index)
    class_names = {c.index: c.name for c in classes} if classes else {i: str(i) for i in range(num_classes)}
    wanted = set(job.data.class_subset) if job.data.class_subset is not None else set(range(num_classes))
    unknown_subset = sorted(wanted - set(range(num_classes)))
    if unknown_subset:
        raise JobError(f"data.class_subset: no such classes {unknown_subset[:5]} (the data set has {num_classes})")

    ledger_path = staging / ("samples.tsv" if ranks.world == 1 else f".samples.rank{ranks.rank}.tsv")
    ledger = Ledger(ledger_path)
    shard_name = [s.name for s in shards]
    dali_device = ranks.local_rank if device.type == "cuda" else None
    try:
        # -- source + select: one header walk per shard, bounded memory (classes x subset)
        t0 = time.perf_counter()
        drawn, seen, drawn_count = index_and_draw(shards, seed=cfg.seed, subset=cfg.subset,
                                                  num_classes=num_classes, wanted=wanted, ledger=ledger,
                                                  ranks=ranks)
        timings.add("source_select", time.perf_counter() - t0, seen)
        if ranks.is_main:
            log(f"{len(shards)} shards, {seen} samples indexed; {sum(drawn_count.values())} drawn "
                f"({cfg.subset} per class at most, {len(drawn_count)} classes)"
                + (f"; {ranks.world} ranks" if ranks.world > 1 else ""))

        # -- decode + crop, score, key patch per image, per-class ranking
        cells = cfg.patches_per_image
        if cfg.method == "rded":
            window, order = crop_window, best_first
        else:  # the baseline: whole images, ranked in draw order so that its slices are random too
            window, order = centre_square, lambda p: draw_order(cfg.seed, p)
        ranking: PerClassTopK[ScoredPatch] = PerClassTopK(cells * cfg.ipc, order=order, class_of=lambda p: p.label)
        scorer = Scorer(observer, mode=cfg.score_mode, resolution=cfg.resolution,
                        score_batch=job.runtime.score_batch, decimals=cfg.score_decimals)
        cutter = Cutter(cfg.crops, batch_size=job.runtime.batch_size, num_threads=job.runtime.dali_threads,
                        decoder=decoder, device_id=dali_device)
        bar = progress_bar(job, len(drawn), "scoring", ranks)
        scored_count = 0
        for start in range(0, len(drawn), job.runtime.batch_size):
            batch = drawn[start:start + job.runtime.batch_size]
            key_patches, undecodable = score_key_patches(
                batch, lambda r: read_member(shards[r.shard].path, r.offset, r.size), cutter, scorer,
                seed=cfg.seed, crops=cfg.crops, patch_size=cfg.patch_size, window=window, timings=timings)
            for ref in undecodable:
                ledger.record(ref.key, shard_name[ref.shard], SKIPPED, "undecodable")
            t0 = time.perf_counter()
            for patch in key_patches:
                for d in ranking.push(patch):
                    ledger.record(d.key, shard_name[d.shard], SCORED)
            timings.add("heap", time.perf_counter() - t0, len(key_patches))
            scored_count += len(key_patches)
            bar.update(len(batch))
        bar.close()
        local_winners, dropped_patches = ranking.finish()
        for d in dropped_patches:
            ledger.record(d.key, shard_name[d.shard], SCORED)
        # exact merge of the ranks' heaps: every rank gets the single-process winners
        merged: PerClassTopK[ScoredPatch] = PerClassTopK(cells * cfg.ipc, order=order, class_of=lambda p: p.label)
        for part in ranks.gather(local_winners):
            for patches in part.values():
                merged.push_all(patches)
        winners, _ = merged.finish()

        # -- write: stitch the winners, shards, contact sheet
        plan = plan_images(winners, cfg.tiers, cells)
        used = {(p_.shard, p_.key) for image in plan for _, p_ in image.patches}
        for c in sorted(local_winners):
            for w in local_winners[c]:
                ledger.record(w.key, shard_name[w.shard], DISTILLED if (w.shard, w.key) in used else SCORED)
        settings = WriteSettings(cfg.resolution, cfg.factor, job.output.shard_size,
                                 job.output.image_format, job.output.jpeg_quality,
                                 job.output.contact_sheet_classes, job.output.contact_sheet_images)
        stitch_cutter = Cutter(1, batch_size=job.runtime.batch_size, num_threads=job.runtime.dali_threads,
                               decoder=decoder, device_id=dali_device)
        relabeler = None
        if job.relabel.enabled:
            relabeler = Relabeler(scorer, seed=cfg.seed, views=job.relabel.views, resolution=cfg.resolution,
                                  factor=cfg.factor, topk=job.relabel.topk)
        t0 = time.perf_counter()
        bar = progress_bar(job, len(plan), "writing + relabelling" if relabeler else "writing", ranks)
        mine = write_distilled(staging, plan, shards, class_names, settings, stitch_cutter, relabeler,
                               on_image=bar.update, owns_output=ranks.owns_output)
        bar.close()
        timings.add("stitch_write", time.perf_counter() - t0 - mine.relabel_seconds, len(plan))
        if relabeler is not None:
            timings.add("relabel", mine.relabel_seconds, len(plan) * (job.relabel.views + cells), unit="labels")
    finally:
        ledger.close()

    # -- every rank has written its part; the main rank writes the run's records and publishes it
    result = merge_results(ranks.gather(mine))
    accounting = merge_accounting(ranks.gather(ledger.summary()))
    scored_count = sum(ranks.gather(scored_count))
    seconds = time.perf_counter() - started
    summary = Summary(out_dir, sum(s.samples for s in result.shards), len(result.shards), len(wanted),
                      scored_count, sum(accounting[SKIPPED].values()), seconds)
    if not ranks.is_main:
        return summary
    if ranks.world > 1:
        concat_ledgers([staging / f".samples.rank{r}.tsv" for r in range(ranks.world)], staging / "samples.tsv")
    write_contact_sheet(staging / "contact-sheet.png", result.thumbnails)
    short = {class_names[c]: n for c, n in ((c, result.images_per_class.get(c, 0)) for c in sorted(wanted))
             if n < cfg.ipc}
    if short:
        log(f"warning: {len(short)} classes have fewer than ipc={cfg.ipc} images (too few decodable samples): "
            + ", ".join(f"{k}: {v}" for k, v in list(short.items())[:10]))
    manifest = {
        "format": MANIFEST_FORMAT,
        "versions": versions(),
        "job": job.public_dict(),
        "device": device.type,
        "decoder": decoder,
        "ipc": cfg.ipc,
        "tiers": cfg.tiers,
        "images": summary.images,
        "classes": [{"index": c, "name": class_names[c], "drawn": drawn_count.get(c, 0),
                     "images": result.images_per_class.get(c, 0)} for c in sorted(wanted)],
        "shards": [vars(s) for s in result.shards],
    }
    if relabeler is not None:
        manifest["labels"] = labels_summary(job, result, num_classes)
    report = {
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "device": device.type,
        "decoder": decoder,
        "ranks": ranks.world,
        "stages": timings.as_dict(),
        "accounting": accounting,
        "short_classes": short,
        "end_to_end_images_per_s": round(scored_count / seconds, 2) if seconds else None,
    }
    write_json(staging / "report.json", report)
    write_json(staging / "manifest.json", manifest)
    publish(staging, out_dir)
    return summary
