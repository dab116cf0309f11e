"""The distillation job, driven stage by stage (DESIGN.md §2):

    source -> select -> decode + crop -> score -> top-k -> write -> relabel

The stages (rded.source, select, crops, score, heap, write, relabel) know nothing of each other's
bookkeeping: this driver owns what crosses them, the timings, the ledger (every input sample gets
exactly one row) and the exact merge of the torchrun ranks' per-class top-ks. Everything that can be
wrong with the job is checked before work starts; outputs are staged and published by rded.rundir.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import JobConfig, ObserverConfig
from .crops import Cutter
from .dist import Ranks, from_environment, shutdown
from .errors import JobError
from .heap import PerClassTopK, Rows
from .keyed import centre_square, crop_window
from .observer import Observer, build_observer, check_observer
from .records import (ClassInfo, PatchRows, SampleRef, SampleRows, ScoredPatch, Shard, Skipped, best_first,
                      draw_order)
from .refine import Refiner, Spool
from .relabel import LabelStats, Relabeler, labels_summary, write_label_shard
from .report import (DISTILLED, EXCLUDED, NOT_DRAWN, SCORED, SKIPPED, Ledger, Timings, concat_ledgers,
                     merge_accounting, peak_rss_mib, progress_bar)
from .rundir import (MANIFEST_FORMAT, STAGING, ClassRecord, Manifest, check_output, discard_staging, make_staging,
                     publish, write_json)
from .runtime import ComputePolicy, resolve_devices
from .score import Scorer, cut_candidates, key_patches
from .select import SubsetDraw
from .source import (FirstOccurrence, canonical_order, expand_shards, load_classes, scan_shard,
                     shard_key_hashes)
from .streams import MemberFetcher, SpooledMembers
from .write import (PlannedImage, WriteResult, WriteSettings, contact_sheet_rows, cut_canvases, merge_results,
                    output_shards, plan_images, stitch, write_contact_sheet, write_image_shard)


def log(msg: str) -> None:
    print(f"rded: {msg}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import PIL
    from nvidia import dali

    return {"rded": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision_version(), "nvidia-dali": dali.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def torchvision_version() -> str:
    """torchvision.__version__ without importing torchvision when the job did not need it: the import
    costs about 160 MB of resident memory, which would be the job's peak if taken for the manifest."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"].__version__
    spec = importlib.util.find_spec("torchvision")
    found = re.search(r"""__version__ = ['"]([^'"]+)['"]""", (Path(spec.origin).parent / "version.py").read_text())
    return found.group(1) if found else importlib.metadata.version("torchvision")


@dataclass
class Summary:
    out_dir: Path
    images: int
    shards: int
    classes: int
    scored_images: int
    skipped: int
    seconds: float
    classes_with_images: int | None = None  # fewer than `classes` when some have no sample

    def line(self) -> str:
        rate = self.scored_images / self.seconds if self.seconds else 0.0
        classes = (f"{self.classes_with_images} of {self.classes} classes"
                   if self.classes_with_images not in (None, self.classes) else f"{self.classes} classes")
        return (f"{self.images} distilled images ({classes}, {self.shards} shards) from "
                f"{self.scored_images} scored source images in {self.seconds:.1f} s ({rate:.1f} images/s); "
                f"{self.skipped} samples skipped; output: {self.out_dir}")


@dataclass
class Run:
    """What every stage of one run (or one rank of it) shares."""

    job: JobConfig
    out_dir: Path
    shards: list[Shard]
    classes: list[ClassInfo] | None
    compute: ComputePolicy  # device, precision and layout of every model call
    decoder: str
    ranks: Ranks
    started: float
    timings: Timings = field(default_factory=Timings)
    class_names: dict[int, str] = field(default_factory=dict)
    wanted: set[int] = field(default_factory=set)
    ledger: Ledger | None = None
    _winners: SpooledMembers | None = None

    @property
    def device(self) -> torch.device:
        return self.compute.device

    @property
    def staging(self) -> Path:
        return self.out_dir / STAGING

    @property
    def stream_spool(self) -> Path:
        """Streamed shards' scored image bytes, for the writer (rded.streams); removed before publishing."""
        return self.staging / ".streamed"

    def read_winner(self, p: ScoredPatch) -> bytes:
        return self.winners(p.shard, p.offset, p.size)

    @property
    def winners(self) -> SpooledMembers:
        if self._winners is None:
            self._winners = SpooledMembers(self.shards, self.stream_spool)
        return self._winners

    def record(self, item: SampleRef | ScoredPatch | Skipped, status: str, reason: str = "") -> None:
        self.ledger.record(item.key, self.shards[item.shard].name, status, reason, item.offset)

    def cutter(self, crops: int) -> Cutter:
        runtime = self.job.runtime
        return Cutter(crops, batch_size=runtime.batch_size, num_threads=runtime.dali_threads, decoder=self.decoder,
                      device_id=self.ranks.local_rank if self.device.type == "cuda" else None,
                      max_batch_pixels=runtime.max_batch_pixels)

    def progress(self, total: int, what: str):
        """Images/s on stderr (the main rank's share when there are several)."""
        return progress_bar(total, what, enabled=self.job.runtime.progress and self.ranks.is_main)


def run_distill(job: JobConfig, out_dir: Path, *, overwrite: bool = False) -> Summary:
    """Run a job, in this process or as one rank of a torchrun launch (detected from the environment)."""
    started = time.perf_counter()
    # -- checks: every failure here is an error before any work (on every rank alike)
    shards = expand_shards(job)
    classes = load_classes(job)
    check_observer(job, classes)
    for i, spec in enumerate(job.refine.observers if job.refine.enabled else []):
        check_observer(job, classes, spec, where=f"refine.observers[{i}]")
    device, decoder = resolve_devices(job.runtime.device, job.runtime.decoder)
    check_output(out_dir, overwrite)
    ranks = from_environment(len(shards), use_cuda=device.type == "cuda")
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    compute = ComputePolicy.resolve(device, job.runtime.precision)
    try:
        if ranks.is_main:
            make_staging(out_dir)
        ranks.barrier()
        return _distill(Run(job, out_dir, shards, classes, compute, decoder, ranks, started))
    except BaseException:
        discard_staging(out_dir)  # nothing half-made stays behind
        raise
    finally:
        shutdown(ranks)


def _distill(run: Run) -> Summary:
    cfg = run.job.distill
    with run.timings.stage("observer_load", items=1, unit="models"):
        observer = build_observer(run.job, run.classes, run.compute)
        refiner = make_refiner(run, observer) if run.job.refine.enabled else None
    set_classes(run, observer)
    ledger_name = "samples.tsv" if run.ranks.world == 1 else f".samples.rank{run.ranks.rank}.tsv"
    run.ledger = Ledger(run.staging / ledger_name)
    try:
        drawn, drawn_count = source_and_select(run)
        scorer = Scorer(observer, mode=cfg.score_mode, resolution=cfg.resolution,
                        score_batch=run.job.runtime.score_batch, decimals=cfg.score_decimals)
        window, order = ((crop_window, best_first) if cfg.method == "rded"  # the baseline: whole images, ranked
                         else (centre_square, lambda p: draw_order(cfg.seed, p)))  # in draw order (random slices)
        local_winners, scored = decode_crop_score(run, drawn, scorer, window, order)
        del drawn
        winners = merged_winners(run, local_winners, order)
        plan = plan_images(winners, cfg.tiers, cfg.patches_per_image)
        record_winners(run, plan, winners, local_winners)
        spool = refine_images(run, plan, refiner) if refiner is not None else None
        relabeler = None
        if run.job.relabel.enabled:
            relabeler = Relabeler(scorer, seed=cfg.seed, views=run.job.relabel.views, resolution=cfg.resolution,
                                  factor=cfg.factor, topk=run.job.relabel.topk,
                                  exact_classes=run.job.relabel.exact_classes,
                                  tail_rank=run.job.relabel.tail_rank)
        written, label_stats = write_and_relabel(run, plan, relabeler, spool)
    finally:
        run.ledger.close()
    return finish(run, written, label_stats, relabeler, drawn_count, scored, spool)


def set_classes(run: Run, observer: Observer) -> None:
    num_classes = len(observer.output_index)
    run.class_names = ({c.index: c.name for c in run.classes} if run.classes
                       else {i: str(i) for i in range(num_classes)})
    subset = run.job.data.class_subset
    run.wanted = set(subset) if subset is not None else set(range(num_classes))
    unknown = sorted(run.wanted - set(range(num_classes)))
    if unknown:
        raise JobError(f"data.class_subset: no such classes {unknown[:5]} (the data set has {num_classes})")


def source_and_select(run: Run) -> tuple[Rows[SampleRef], dict[int, int]]:
    """One header walk per shard this rank owns, and the per-class bottom-k draw, merged across ranks.

    Returns this rank's drawn samples in reading order (shard name, offset): sequential within a shard,
    and the same whatever order the job lists its shards in; and the drawn count per class, all ranks.
    """
    cfg, ranks, num_classes = run.job.distill, run.ranks, len(run.class_names)
    t0 = time.perf_counter()
    order = canonical_order(run.shards)
    positions = ranks.shard_positions(len(order))
    shard_keys = None
    if ranks.world > 1 and ranks.split_by_shard:  # copies of a key may sit in other ranks' shards
        shard_keys = {p: h for part in ranks.gather({p: shard_key_hashes(run.shards[order[p]])
                                                     for p in positions}) for p, h in part.items()}
    first = FirstOccurrence(shard_keys)
    draw = SubsetDraw(cfg.seed, cfg.subset)
    seen = 0
    for position in positions:
        first.next_shard(position)
        for rec in scan_shard(order[position], run.shards[order[position]]):
            if not ranks.owns_sample(position, rec.key):
                continue
            seen += 1
            if isinstance(rec, Skipped) and rec.reason == "corrupt_shard":
                run.record(rec, SKIPPED, rec.reason)
            elif not first.is_first(rec.key):
                run.record(rec, SKIPPED, "duplicate_key")
            elif isinstance(rec, Skipped):
                run.record(rec, SKIPPED, rec.reason)
            elif not 0 <= rec.label < num_classes:
                run.record(rec, SKIPPED, "unknown_class")
            elif rec.label not in run.wanted:
                run.record(rec, EXCLUDED)
            else:
                for r in draw.offer(rec):
                    run.record(r, NOT_DRAWN)
    local, dropped = draw.finish()
    for r in dropped:
        run.record(r, NOT_DRAWN)
    drawn = ranks.merge_top(local, cfg.subset, draw.order)
    if not drawn:  # e.g. every URL failed: say why now rather than publish an empty run
        acc = merge_accounting(ranks.gather(run.ledger.summary()))
        why = [f"{n} {reason}" for reason, n in acc[SKIPPED].items()] + \
              ([f"{acc[EXCLUDED]} of classes not in data.class_subset"] if acc[EXCLUDED] else [])
        examples = acc["skipped_examples"].get("corrupt_shard", [])[:3]
        raise JobError(f"data.train: no usable sample in {len(run.shards)} shards ({acc['input_samples']} read"
                       + (f"; {', '.join(why)}" if why else "") + ")"
                       + (f"; broke off at {', '.join(examples)}" if examples else ""))
    if ranks.world == 1:
        parts = list(local.values())
    else:  # keep what the merge kept of this rank's draw
        drawn_ids = {(r.shard, r.key) for refs in drawn.values() for r in refs}
        mine = []
        for r in (r for refs in local.values() for r in refs):
            if (r.shard, r.key) in drawn_ids:
                mine.append(r)
            else:
                run.record(r, NOT_DRAWN)
        parts = [Rows.of(SampleRows, mine, draw.order)]
    seen_all = sum(ranks.gather(seen))
    run.timings.add("source_select", time.perf_counter() - t0, seen_all)
    if ranks.is_main:
        log(f"{len(run.shards)} shards, {seen_all} samples indexed; {sum(len(v) for v in drawn.values())} drawn "
            f"({cfg.subset} per class at most, {len(drawn)} classes)"
            + (f"; {ranks.world} ranks" if ranks.world > 1 else ""))
    return in_reading_order(run.shards, parts), {c: len(v) for c, v in drawn.items()}


def in_reading_order(shards: list[Shard], parts: list[Rows[SampleRef]]) -> Rows[SampleRef]:
    """Drawn samples by (shard name, offset): sequential within a shard, and the same whatever order the
    job lists its shards in."""
    rows = parts[0].concat(*parts[1:]).array
    by_name = sorted(range(len(shards)), key=lambda i: shards[i].name)
    name_rank = np.empty(len(shards), np.int64)
    name_rank[by_name] = np.arange(len(shards))
    return Rows(SampleRows, rows[np.lexsort((rows["offset"], name_rank[rows["shard"]]))])


def decode_crop_score(run: Run, drawn: Rows[SampleRef], scorer: Scorer, window: Callable,
                      order: Callable) -> tuple[dict[Any, Sequence[ScoredPatch]], int]:
    """Decode + crop K candidates per drawn image, score them, keep each image's best, and keep each
    class's best N x IPC in a top-k. Returns (this rank's per-class top-k, images scored by all ranks)."""
    cfg, runtime = run.job.distill, run.job.runtime
    # numpy rows, like the draw: at ImageNet scale the ranking holds up to 300,000 scored patches
    ranking: PerClassTopK[ScoredPatch] = PerClassTopK(cfg.patches_per_image * cfg.ipc, order=order,
                                                      class_of=lambda p: p.label, codec=PatchRows)
    cutter = run.cutter(cfg.crops)
    bar = run.progress(len(drawn), "scoring")
    scored = 0
    # `drawn` is in (shard name, offset) order, so a streamed shard is one forward pass here
    fetch = MemberFetcher(run.shards, run.stream_spool, run.ranks.rank)
    try:
        for start in range(0, len(drawn), runtime.batch_size):
            batch = drawn[start:start + runtime.batch_size]
            scored += _score_batch(run, batch, fetch, cutter, scorer, window, ranking)
            bar.update(len(batch))
    finally:
        fetch.close()  # the spool is complete before the ranks merge their winners
    bar.close()
    local_winners, dropped = ranking.finish()
    for d in dropped:
        run.record(d, SCORED)
    return local_winners, sum(run.ranks.gather(scored))


def _score_batch(run: Run, batch: list[SampleRef], fetch: MemberFetcher, cutter: Cutter, scorer: Scorer,
                 window: Callable, ranking: PerClassTopK[ScoredPatch]) -> int:
    """Decode, crop and score one batch of drawn images into the per-class top-k; returns images scored."""
    cfg, runtime = run.job.distill, run.job.runtime
    with run.timings.stage("decode_crop", len(batch)):
        candidates, rejected = cut_candidates(
            batch, lambda r: fetch(r.shard, r.offset, r.size), cutter,
            seed=cfg.seed, crops=cfg.crops, patch_size=cfg.patch_size, window=window,
            max_pixels=runtime.max_pixels)
    with run.timings.stage("score", len(candidates.images) * cfg.crops, unit="patches"):
        best = key_patches(candidates, scorer)
    for ref, reason in rejected:
        run.record(ref, SKIPPED, reason)
    with run.timings.stage("heap", len(best)):
        dropped = set()
        for patch in best:
            for d in ranking.push(patch):
                run.record(d, SCORED)
                dropped.add((d.shard, d.offset))
    # only a patch still in the top-k can become a winner: spool its bytes (streamed shards)
    fetch.keep((p.shard, p.offset) for p in best if (p.shard, p.offset) not in dropped)
    return len(best)


def merged_winners(run: Run, local: dict[Any, Rows[ScoredPatch]], order: Callable) -> dict[Any, Rows[ScoredPatch]]:
    """Every rank's winners merged, kept as numpy rows: at ImageNet scale 200,000 patches."""
    merged = run.ranks.merge_top(local, run.job.distill.patches_per_image * run.job.distill.ipc, order)
    if run.ranks.world == 1:  # this rank's own rows
        return merged
    return {c: Rows.of(PatchRows, patches, order) for c, patches in merged.items()}


def record_winners(run: Run, plan: list[PlannedImage], winners: dict[Any, Sequence[ScoredPatch]],
                   local: dict[Any, Sequence[ScoredPatch]]) -> None:
    """This rank's winners in the ledger: distilled when an image uses them, else scored."""
    used_ranks: dict[Any, set[int]] = {c: set() for c in winners}
    for image in plan:
        used_ranks[image.label].update(image.ranks)
    if run.ranks.world == 1:  # the winners are this rank's: a winner's rank says it
        for c in sorted(local):
            for r, w in enumerate(local[c]):
                run.record(w, DISTILLED if r in used_ranks[c] else SCORED)
        return
    used = {(p.shard, p.key) for c, ranks in used_ranks.items() for r, p in enumerate(winners[c]) if r in ranks}
    for c in sorted(local):
        for w in local[c]:
            run.record(w, DISTILLED if (w.shard, w.key) in used else SCORED)


def describe_observer(spec: ObserverConfig) -> str:
    """An observer in a record: its kind, architecture and weights file name."""
    return spec.kind + (f":{spec.arch}" if spec.arch else "") + (f" ({Path(spec.weights).name})" if spec.weights else "")


def refine_observer_names(job: JobConfig) -> list[str]:
    return [describe_observer(spec) for spec in job.refine.observers or [job.observer]]


def make_refiner(run: Run, observer: Observer) -> Refiner:
    """The refine stage's observers (the job's when refine.observers is empty), checked for BN layers now,
    before any data is read."""
    cfg = run.job.refine
    observers = [observer] if not cfg.observers else [
        build_observer(run.job, run.classes, run.compute, spec) for spec in cfg.observers]
    return Refiner(cfg, observers, refine_observer_names(run.job), seed=run.job.distill.seed,
                   resolution=run.job.distill.resolution)


def refine_images(run: Run, plan: list[PlannedImage], refiner: Refiner) -> Spool:
    """Refine every planned image, a batch per image index (image j of every class, so tiers stay exact);
    this rank takes the batches j = rank (mod world). The refined images wait in a spool for the writer."""
    cfg = run.job.distill
    spool = Spool(run.staging / ".refined")
    batches: dict[int, list[PlannedImage]] = {}
    for image in plan:
        batches.setdefault(image.image_index, []).append(image)
    cutter = run.cutter(1)
    bar = run.progress(len(plan), "refining")
    for j in sorted(batches):
        if j % run.ranks.world != run.ranks.rank:
            continue
        images = batches[j]
        with run.timings.stage("refine", len(images)):
            canvases = np.stack(cut_canvases(images, run.shards, cfg.resolution, cfg.factor, cutter,
                                              read=run.read_winner))
            refined, record = refiner.refine(canvases, [im.label for im in images], j)
        for image, pixels in zip(images, refined):
            spool.put(image.key, pixels)
        spool.put_record(record)
        first, last = record.stages[0], record.stages[-1]
        if run.ranks.is_main and not run.job.runtime.progress:
            log(f"refined batch {j} (image {j} of {len(images)} classes): loss {first.loss_start:.3f} -> {last.loss_end:.3f}")
        bar.update(len(images))
    bar.close()
    run.ranks.barrier()
    return spool


def write_and_relabel(run: Run, plan: list[PlannedImage], relabeler: Relabeler | None,
                      spool: Spool | None = None) -> tuple[WriteResult, LabelStats]:
    """Stitch (or take from the refine spool) the planned images of the output shards this rank owns, write
    them, and label each shard's images from their stored bytes. Returns every rank's results, merged."""
    out, cfg = run.job.output, run.job.distill
    settings = WriteSettings(cfg.resolution, cfg.factor, out.shard_size, out.image_format, out.jpeg_quality,
                             contact_sheet_rows(plan, out.contact_sheet_classes), out.contact_sheet_images)
    cutter = run.cutter(1)
    refined = None
    if spool is not None:
        observers = refine_observer_names(run.job)
        stages = {r["image_index"]: r["stages"] for r in spool.records()}

        def from_spool(image: PlannedImage) -> tuple[np.ndarray, dict[str, Any]]:
            return spool.image(image.key), {"observers": observers, "stages": stages[image.image_index]}
        refined = from_spool
    result, stats = WriteResult(), LabelStats()
    bar = run.progress(len(plan), "writing + relabelling" if relabeler else "writing")
    relabel_seconds, started = 0.0, time.perf_counter()
    for shard_no, chunk in enumerate(output_shards(plan, out.shard_size)):
        if not run.ranks.owns_output(shard_no):
            continue
        samples = stitch(chunk, run.shards, run.class_names, settings, cutter, result, run.read_winner,
                         on_image=bar.update if relabeler is None else lambda n: None, refined=refined)
        record = write_image_shard(run.staging, shard_no, chunk[0].tier, samples)
        if relabeler is not None:
            t0 = time.perf_counter()
            record.labels = write_label_shard(run.staging, shard_no, samples, out.image_format, relabeler, stats,
                                              on_image=bar.update)
            relabel_seconds += time.perf_counter() - t0
        result.shards.append(record)
    bar.close()
    run.timings.add("stitch_write", time.perf_counter() - started - relabel_seconds, len(plan))
    if relabeler is not None:
        run.timings.add("relabel", relabel_seconds, len(plan) * (relabeler.views + cfg.patches_per_image),
                        unit="labels")
    return merge_results(run.ranks.gather(result)), LabelStats.merge(run.ranks.gather(stats))


def finish(run: Run, result: WriteResult, label_stats: LabelStats, relabeler: Relabeler | None,
           drawn_count: dict[int, int], scored: int, spool: Spool | None = None) -> Summary:
    """The run's records (manifest, report, ledger, contact sheet), written and published by the main rank."""
    cfg, ranks = run.job.distill, run.ranks
    accounting = merge_accounting(ranks.gather(run.ledger.summary()))
    seconds = time.perf_counter() - run.started
    per_class = {c: result.images_per_class.get(c, 0) for c in sorted(run.wanted)}
    summary = Summary(run.out_dir, sum(s.samples for s in result.shards), len(result.shards), len(run.wanted),
                      scored, sum(accounting[SKIPPED].values()), seconds, sum(1 for n in per_class.values() if n))
    if not ranks.is_main:
        return summary
    if ranks.world > 1:
        concat_ledgers([run.staging / f".samples.rank{r}.tsv" for r in range(ranks.world)],
                       run.staging / "samples.tsv")
    shutil.rmtree(run.stream_spool, ignore_errors=True)
    write_contact_sheet(run.staging / "contact-sheet.png", result.thumbnails)
    # a class with no samples is normal when the classes are an observer's 1,000 outputs and the data has a few
    empty = [run.class_names[c] for c, n in per_class.items() if n == 0]
    short = {run.class_names[c]: n for c, n in per_class.items() if 0 < n < cfg.ipc}
    if short:
        log(f"warning: {len(short)} classes have fewer than ipc={cfg.ipc} images (too few decodable samples): "
            + ", ".join(f"{k}: {v}" for k, v in list(short.items())[:10]))
    if empty:
        log(f"note: {len(empty)} of {len(per_class)} classes have no images (no decodable samples): "
            + ", ".join(empty[:10]) + (", ..." if len(empty) > 10 else ""))
    manifest = Manifest(
        format=MANIFEST_FORMAT, versions=versions(), job=run.job.public_dict(), device=run.device.type,
        decoder=run.decoder, precision=run.compute.precision, ipc=cfg.ipc, tiers=cfg.tiers, images=summary.images,
        classes=[ClassRecord(c, run.class_names[c], drawn_count.get(c, 0), n) for c, n in per_class.items()],
        shards=result.shards)
    refine_report = None
    if spool is not None:
        manifest.refine = {"settings": run.job.refine.model_dump(mode="json", exclude={"enabled", "observers"}),
                           "observers": refine_observer_names(run.job),
                           "batches": spool.records()}
        shutil.rmtree(spool.dir)
        stage = run.timings.stages.get("refine")
        refine_report = {"seconds_per_image": round(stage.seconds / stage.items, 4) if stage and stage.items else None,
                         "peak_gpu_mib": (round(torch.cuda.max_memory_allocated(run.device) / 2**20, 1)
                                          if run.device.type == "cuda" else None)}
    if relabeler is not None:
        manifest.labels = labels_summary(relabeler, label_stats, sum(s.bytes for s in result.shards),
                                         sum(s.labels["bytes"] for s in result.shards))
    write_json(run.staging / "report.json", {
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "device": run.device.type,
        "decoder": run.decoder,
        "compute": run.compute.record(),
        "ranks": ranks.world,
        "stages": run.timings.as_dict(),
        "accounting": accounting,
        "short_classes": short,
        "empty_classes": {"count": len(empty), "classes": empty},
        "end_to_end_images_per_s": round(scored / seconds, 2) if seconds else None,
        **({"refine": refine_report} if refine_report else {}),
    })
    publish(run.out_dir, manifest)
    return summary
