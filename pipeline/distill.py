"""The distillation job, driven stage by stage (DESIGN.md §2):

    source -> select -> decode + crop -> score -> top-k -> write -> relabel

The stages (rded.source, select, crops, score, heap, write, relabel) know nothing of each other's
bookkeeping: this driver owns what crosses them, the timings, the ledger (every input sample gets
exactly one row) and the exact merge of the torchrun ranks' per-class top-ks. Everything that can be
wrong with the job is checked before work starts; outputs are staged and published by rded.rundir.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .bnstats import FILE as BN_STATS_FILE
from .bnstats import DataStatistics, first_drawn, measure
from .cards import write_cards
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import (Checkpoint, IndexDigest, event, identity_differences, npz_arrays, npz_bytes, publish_step,
                         result_settings, run_identity, without_attempt_settings)
from .config import JobConfig, ObserverConfig
from .crops import Cutter
from .dist import Ranks, from_environment, restarts_share_the_agent_store, shutdown
from .errors import JobError, OutputIOError, RankFailed, RdedError
from .heap import PerClassTopK, Rows
from .keyed import centre_square, crop_window
from .observer import Observer, build_observer, check_observer
from .records import (ClassInfo, PatchRows, SampleRef, SampleRows, ScoredPatch, Shard, Skipped, best_first,
                      draw_order)
from .refine import Refiner, Spool
from .relabel import LabelStats, Relabeler, labels_summary, write_label_shard
from .report import (DISTILLED, EXCLUDED, NOT_DRAWN, SCORED, SKIPPED, Ledger, Timings, assemble_ledger,
                     merge_accounting, peak_rss_mib, progress_bar)
from .rundir import MANIFEST, MANIFEST_FORMAT, ClassRecord, Manifest, ShardRecord, check_output, write_json
from .runtime import ComputePolicy, refinement_precision, resolve_devices
from .score import Scorer, cut_candidates, key_patches
from .select import SubsetDraw
from .staging import RunLock, Staging
from .source import (BrokenShard, FirstOccurrence, Replay, broken_shards, canonical_order, expand_shards, fetch_break,
                     index_break, load_classes, load_fetch_break, save_fetch_break, scan_shard, shard_key_hashes,
                     unnamed)
from .streams import MemberFetcher, RetryPolicy, SpooledMembers, StreamBroken, Streams, StreamStats, spool_is_whole
from .tario import sha256_file, write_bytes_atomic
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
    broken_shards: int = 0  # input shards that broke off and were skipped (data.broken_shards = "skip")

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
    checkpoint: Checkpoint | None = None
    identity: dict[str, Any] = field(default_factory=dict)  # rded.checkpoint.run_identity
    timings: Timings = field(default_factory=Timings)
    class_names: dict[int, str] = field(default_factory=dict)
    wanted: set[int] = field(default_factory=set)
    ledger: Ledger | None = None
    # refine.bn_stats = "data": the sampled images by (shard, offset), in draw order; their statistics' summary
    bn_sample: dict[tuple[int, int], SampleRef] = field(default_factory=dict)
    bn_stats: dict[str, Any] | None = None
    _winners: SpooledMembers | None = None

    @property
    def device(self) -> torch.device:
        return self.compute.device

    @cached_property
    def layout(self) -> Staging:
        return Staging(self.out_dir)

    @property
    def staging(self) -> Path:
        return self.layout.dir

    @property
    def ledger_dir(self) -> Path:
        """Ledger parts (every rank's, canonical order assembled at the end)."""
        return self.layout.ledger

    @cached_property
    def position(self) -> np.ndarray:
        """Each shard's place in the canonical (by name) order, by shard index."""
        position = np.empty(len(self.shards), np.int64)
        position[canonical_order(self.shards)] = np.arange(len(self.shards))
        return position

    @cached_property
    def streams(self) -> Streams:
        """This rank's input reads: the retry policy (runtime.retries, ...), its counts (`as_dict()` for
        report.json) and the shards that broke off (rded.source.broken_shards)."""
        return Streams(RetryPolicy.of(self.job.runtime))

    @property
    def stream_spool(self) -> Path:
        """Streamed shards' scored image bytes, for the writer (rded.streams); removed after publishing."""
        return self.layout.stream_spool

    def read_winner(self, p: ScoredPatch) -> bytes:
        return self.winners(p.shard, p.offset, p.size)

    @property
    def winners(self) -> SpooledMembers:
        if self._winners is None:
            self._winners = SpooledMembers(self.shards, self.stream_spool)
        return self._winners

    def record(self, item: SampleRef | ScoredPatch | Skipped, status: str, reason: str = "") -> None:
        self.ledger.record(item.key, self.shards[item.shard].name, status, reason, item.offset,
                           int(self.position[item.shard]))

    def cutter(self, crops: int) -> Cutter:
        runtime = self.job.runtime
        return Cutter(crops, batch_size=runtime.batch_size, num_threads=runtime.dali_threads, decoder=self.decoder,
                      device_id=self.ranks.local_rank if self.device.type == "cuda" else None,
                      max_batch_pixels=runtime.max_batch_pixels)

    def progress(self, total: int, what: str):
        """Images/s on stderr (the main rank's share when there are several)."""
        return progress_bar(total, what, enabled=self.job.runtime.progress and self.ranks.is_main)


def run_distill(job: JobConfig, out_dir: Path, *, overwrite: bool = False, resume: bool = False) -> Summary | None:
    """Run a job, in this process or as one rank of a torchrun launch (detected from the environment).

    `resume`: continue the unfinished run in `out_dir` from the work it committed (rded.checkpoint), or
    start one where there is none; a finished run of the same identity is left as it is (returns None)."""
    started = time.perf_counter()
    checked = check_job(job, resume=resume, overwrite=overwrite)
    ranks = from_environment(len(checked.shards), use_cuda=checked.device.type == "cuda",
                             timeout_s=job.runtime.dist_timeout)
    if ranks.is_main and restarts_share_the_agent_store():
        log("warning: torchrun --max-restarts with its TCP store shared (torch's default) can leave restarted "
            "workers unable to connect (pytorch/pytorch#135712); launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that restarts resume reliably")
    device = torch.device("cuda", ranks.local_rank) if checked.device.type == "cuda" else checked.device
    compute = ComputePolicy.resolve(device, job.runtime.precision)
    identity = checked.identity(compute, ranks.world)
    staging, lock = Staging(out_dir), RunLock(out_dir)
    try:
        decision = on_main_rank(ranks, lambda: (lock.acquire(), open_staging(staging, identity, resume, overwrite))[1])
        if decision == "finished":
            return None
        checkpoint = Checkpoint(staging.checkpoint, ranks.rank, resumed=decision == "resume")
        return _distill(Run(job, out_dir, checked.shards, checked.classes, compute, checked.decoder, ranks, started,
                            checkpoint, identity=identity))
    except BaseException as e:
        if lock.held:
            keep_or_discard(staging)
        raise output_error(e, out_dir) or e
    finally:
        lock.release()
        shutdown(ranks)


@dataclass
class CheckedJob:
    """A job checked before any work: its shards, classes and where it runs."""

    job: JobConfig
    shards: list[Shard]
    classes: list[ClassInfo] | None
    device: torch.device
    decoder: str

    def identity(self, compute: ComputePolicy, world: int) -> dict[str, Any]:
        return run_identity(self.job.public_dict(), [s.name for s in self.shards],
                            {"device": compute.device.type, "decoder": self.decoder, "precision": compute.precision},
                            versions(), world)


def check_job(job: JobConfig, *, resume: bool, overwrite: bool) -> CheckedJob:
    """Every check that needs no work: an error here is exit 2 before anything starts (on every rank alike)."""
    if resume and overwrite:
        raise JobError("--resume and --overwrite exclude each other: --resume continues a run, --overwrite "
                       "starts afresh")
    shards = expand_shards(job)
    classes = load_classes(job)
    check_observer(job, classes)
    for i, spec in enumerate(job.refine.observers if job.refine.enabled else []):
        check_observer(job, classes, spec, where=f"refine.observers[{i}]")
    device, decoder = resolve_devices(job.runtime.device, job.runtime.decoder)
    if job.runtime.threads:
        torch.set_num_threads(job.runtime.threads)
    return CheckedJob(job, shards, classes, device, decoder)


def check_run(job: JobConfig, out_dir: Path, *, overwrite: bool = False, resume: bool = False) -> str:
    """`rded distill --check`: what a start would do, or the JobError it would end with; no work, no lock
    taken, nothing written. (The rank count is not known here: a resume on another rank count is refused
    by the workers.)"""
    checked = check_job(job, resume=resume, overwrite=overwrite)
    identity = checked.identity(ComputePolicy.resolve(checked.device, job.runtime.precision), 0)
    del identity["ranks"]
    holder = RunLock(out_dir).held_elsewhere()
    if holder:  # not an error here: the holder may be this run's own rank 0, about to be restarted by torchrun
        log(f"note: {out_dir} is in use by another rded process now ({holder}); the run itself is refused "
            "(exit 2) if it still is when it starts")
    return open_staging(Staging(out_dir), identity, resume, overwrite, dry=True)


def on_main_rank(ranks: Ranks, start: Callable[[], str]) -> str:
    """`start` on the main rank only; every rank returns its result or raises its error (the others as
    RankFailed with the same exit code). Also the barrier after which the staging folder is ready."""
    result, failure = None, None
    if ranks.is_main:
        try:
            result = start()
        except BaseException as e:
            failure = e
    outcome = ranks.gather((result, None if failure is None else (exit_code(failure), str(failure))))[0]
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise RankFailed(f"rank 0: {outcome[1][1]}", outcome[1][0])
    return outcome[0]


def exit_code(e: BaseException) -> int:
    if isinstance(e, RdedError):
        return e.exit_code
    if isinstance(e, SystemExit) and isinstance(e.code, int):
        return e.code
    return 1


def open_staging(staging: Staging, identity: dict[str, Any], resume: bool, overwrite: bool, *,
                 dry: bool = False) -> str:
    """Decide what this start does with the output directory, under its lock: "resume" the unfinished run
    (its identity checked), leave a "finished" one of the same identity, or start "fresh". A publish that a
    kill interrupted is finished first (a dry run reads the staged manifest as the finished run's)."""
    out_dir = staging.out_dir
    manifest_path = out_dir / MANIFEST
    if staging.staged_manifest.is_file():
        if dry:
            manifest_path = staging.staged_manifest
        else:
            staging.recover()
            log(f"finished publishing the run that was staged in {out_dir}")
    found = None if dry and manifest_path != out_dir / MANIFEST else Checkpoint(staging.checkpoint).read_identity()
    if resume and found is not None:
        Checkpoint(staging.checkpoint).check_identity(identity, out_dir)
        log(f"resuming the unfinished run in {out_dir}")
        return "resume"
    if resume and manifest_path.is_file():
        differences = identity_differences(finished_identity(manifest_path), {**identity, "ranks": None})
        if differences:
            raise JobError(f"--resume: {out_dir} holds a finished run that differs from this job in "
                           f"{'; '.join(differences)}; pass --overwrite (without --resume) to replace it")
        log(f"{out_dir} holds a finished run of this job: nothing to resume")
        return "finished"
    check_output(out_dir, overwrite)
    if staging.committed_work():
        log(f"note: starting afresh; the unfinished run's committed work in {staging.dir} is discarded "
            "(--resume continues it)")
    if not dry:
        staging.fresh()
        Checkpoint(staging.checkpoint).write_identity(identity)
    return "fresh"


def finished_identity(manifest_path: Path) -> dict[str, Any]:
    """A finished run's identity; for runs published before manifests recorded it, what the manifest says."""
    manifest = Manifest.from_json(json.loads(manifest_path.read_text()), manifest_path)
    if manifest.identity is not None:
        return manifest.identity
    return {"format": CHECKPOINT_FORMAT, "settings": result_settings(manifest.job), "versions": manifest.versions,
            "resolved": {"device": manifest.device, "decoder": manifest.decoder, "precision": manifest.precision}}


def keep_or_discard(staging: Staging) -> None:
    """After a failure: committed work (or a staged run) stays for --resume; a staging folder with nothing
    worth resuming goes, so nothing half-made stays behind."""
    try:
        if not staging.committed_work():
            staging.discard()
        else:
            log(f"the run stopped; its committed work is kept in {staging.dir} (hidden, never taken for a "
                f"finished run): rerun with --resume to continue it, or --overwrite to start afresh")
    except OSError:
        pass  # the storage that failed may fail again here: the work stays as it is


_OUTPUT_ERRNOS = {errno.ENOSPC: "free space on that file system", errno.EDQUOT: "raise the quota or free space",
                  errno.EROFS: "the file system is read-only: mount it writable",
                  errno.EFBIG: "a file exceeds the file-size limit (ulimit -f)",
                  errno.EACCES: "this user (uid {uid}) may not write there: fix the permissions",
                  errno.EPERM: "this user (uid {uid}) may not write there: fix the permissions"}


def output_error(e: BaseException, out_dir: Path) -> OutputIOError | None:
    """An OSError of the output's storage as one line naming the path and what to do (exit 74); None for
    any other error. Permission errors count only for paths in the output directory."""
    if not isinstance(e, OSError) or e.errno not in _OUTPUT_ERRNOS:
        return None
    path = Path(e.filename) if e.filename else out_dir
    inside = path.resolve().is_relative_to(out_dir.resolve())
    if e.errno in (errno.EACCES, errno.EPERM) and not inside:
        return None
    advice = _OUTPUT_ERRNOS[e.errno].format(uid=os.getuid())
    err = OutputIOError(f"{path}: {e.strerror}: {advice}; the committed work is kept: then rerun with --resume")
    err.__cause__ = e
    return err


def _distill(run: Run) -> Summary:
    cfg = run.job.distill
    with run.timings.stage("observer_load", items=1, unit="models"):
        observer = build_observer(run.job, run.classes, run.compute)
        refiner = make_refiner(run, observer) if run.job.refine.enabled else None
    set_classes(run, observer)
    run.ledger = Ledger(run.ledger_dir / f"index.r{run.ranks.rank}.tsv")  # redone on every attempt
    try:
        drawn, drawn_count = source_and_select(run)
        run.bn_sample = bn_stats_sample(run, drawn)
        scorer = Scorer(observer, mode=cfg.score_mode, resolution=cfg.resolution,
                        score_batch=run.job.runtime.score_batch, decimals=cfg.score_decimals)
        window, order = ((crop_window, best_first) if cfg.method == "rded"  # the baseline: whole images, ranked
                         else (centre_square, lambda p: draw_order(cfg.seed, p)))  # in draw order (random slices)
        run.ledger.close()
        local_winners, scored, units = decode_crop_score(run, drawn, scorer, window, order)
        del drawn
        winners = merged_winners(run, local_winners, order)
        plan = plan_images(winners, cfg.tiers, cfg.patches_per_image)
        run.ledger = Ledger(run.ledger_dir / f"drawn.r{run.ranks.rank}.tsv")
        record_scored(run, plan, winners, units)
        spool = refine_images(run, plan, refiner) if refiner is not None else None
        relabeler = None
        if run.job.relabel.enabled:
            relabeler = Relabeler(scorer, seed=cfg.seed, views=run.job.relabel.views, resolution=cfg.resolution,
                                  factor=cfg.factor, topk=run.job.relabel.topk,
                                  exact_classes=run.job.relabel.exact_classes,
                                  tail_rank=run.job.relabel.tail_rank, view_grid=run.job.view_grid,
                                  view_scale=run.job.view_scale)
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
    cfg, ranks = run.job.distill, run.ranks
    t0 = time.perf_counter()
    order = canonical_order(run.shards)
    positions = ranks.shard_positions(len(order))
    # a resumed run ends each shard where its first attempt recorded a break, so it indexes the same records
    before = IndexDigest.recorded(run.checkpoint) if run.checkpoint.resumed else {}
    replays = {p: Replay(b["records"], b["at"], b["cause"]) for p, e in before.items() if (b := e.get("broken"))}
    shard_keys = None
    if ranks.world > 1 and ranks.split_by_shard:  # copies of a key may sit in other ranks' shards
        shard_keys = {p: h for part in ranks.gather({p: shard_key_hashes(run.shards[order[p]], run.streams,
                                                                         replays.get(p))
                                                     for p in positions}) for p, h in part.items()}
    first = FirstOccurrence(shard_keys)
    draw = SubsetDraw(cfg.seed, cfg.subset)
    digest = IndexDigest()
    seen = 0
    failure: RdedError | None = None
    for position in positions:
        shard = run.shards[order[position]]
        first.next_shard(position)
        records, broken = 0, None
        for rec in scan_shard(order[position], shard, run.streams, replays.get(position)):
            if isinstance(rec, BrokenShard):
                failure = index_break(shard, rec, records, before.get(position), run.job.data.broken_shards,
                                      run.out_dir)
                if failure is not None:
                    break
                broken = {"at": rec.key, "cause": rec.cause, "records": records}
                run.streams.note_broken(shard.name, "index", rec.key, rec.cause, samples=1)
            records += 1
            if not ranks.owns_sample(position, rec.key):
                continue
            digest.add(position, run.shards[rec.shard].name, rec.key, rec.offset,
                       rec.reason if isinstance(rec, Skipped) else f"{rec.label}:{rec.size}")
            seen += 1
            index_record(run, rec, first, draw)
        if failure is not None:  # before check_inputs records anything: a later --resume is not refused
            break
        digest.finish_shard(position, shard.name, records, broken)
        event()
    failures = [f for f in ranks.gather(failure) if f is not None]  # every rank ends alike
    if failures:
        raise failures[0]
    run.checkpoint.check_inputs(digest, run.out_dir)
    local, dropped = draw.finish()
    for r in dropped:
        run.record(r, NOT_DRAWN)
    drawn = ranks.merge_top(local, cfg.subset, draw.order)
    if not drawn:  # e.g. every URL failed: say why now rather than publish an empty run
        raise no_usable_sample(run)
    parts = list(local.values()) if ranks.world == 1 else [kept_by_the_merge(run, local, drawn, draw.order)]
    seen_all = sum(ranks.gather(seen))
    run.timings.add("source_select", time.perf_counter() - t0, seen_all)
    if ranks.is_main:
        log(f"{len(run.shards)} shards, {seen_all} samples indexed; {sum(len(v) for v in drawn.values())} drawn "
            f"({cfg.subset} per class at most, {len(drawn)} classes)"
            + (f"; {ranks.world} ranks" if ranks.world > 1 else ""))
    return in_reading_order(run.position, parts), {c: len(v) for c, v in drawn.items()}


def index_record(run: Run, rec: SampleRef | Skipped, first: FirstOccurrence, draw: SubsetDraw) -> None:
    """An indexed record's ledger row, or its offer to the per-class draw."""
    if isinstance(rec, Skipped) and rec.reason == "corrupt_shard":
        run.record(rec, SKIPPED, rec.reason)
    elif not first.is_first(rec.key):
        run.record(rec, SKIPPED, "duplicate_key")
    elif isinstance(rec, Skipped):
        run.record(rec, SKIPPED, rec.reason)
    elif not 0 <= rec.label < len(run.class_names):
        run.record(rec, SKIPPED, "unknown_class")
    elif rec.label not in run.wanted:
        run.record(rec, EXCLUDED)
    else:
        for r in draw.offer(rec):
            run.record(r, NOT_DRAWN)


def no_usable_sample(run: Run) -> JobError:
    """Why no shard gave a usable sample: the counts per reason (every rank's) and where shards broke off."""
    acc = merge_accounting(run.ranks.gather(run.ledger.summary()))
    why = [f"{n} {reason}" for reason, n in acc[SKIPPED].items()] + \
          ([f"{acc[EXCLUDED]} of classes not in data.class_subset"] if acc[EXCLUDED] else [])
    examples = acc["skipped_examples"].get("corrupt_shard", [])[:3]
    return JobError(f"data.train: no usable sample in {len(run.shards)} shards ({acc['input_samples']} read"
                    + (f"; {', '.join(why)}" if why else "") + ")"
                    + (f"; broke off at {', '.join(examples)}" if examples else ""))


def kept_by_the_merge(run: Run, local: dict[int, Rows[SampleRef]], drawn: dict[int, Sequence[SampleRef]],
                      order: Callable) -> Rows[SampleRef]:
    """This rank's part of the merged draw; the rest of its own draw is recorded as not drawn."""
    drawn_ids = {(r.shard, r.key) for refs in drawn.values() for r in refs}
    mine = []
    for r in (r for refs in local.values() for r in refs):
        if (r.shard, r.key) in drawn_ids:
            mine.append(r)
        else:
            run.record(r, NOT_DRAWN)
    return Rows.of(SampleRows, mine, order)


def in_reading_order(position: np.ndarray, parts: list[Rows[SampleRef]]) -> Rows[SampleRef]:
    """Drawn samples by (shard name, offset), `position` being each shard's place by name: sequential within
    a shard, and the same whatever order the job lists its shards in."""
    rows = parts[0].concat(*parts[1:]).array
    return Rows(SampleRows, rows[np.lexsort((rows["offset"], position[rows["shard"]]))])


@dataclass
class ScoreUnit:
    """One input shard's scoring, as committed: its key patches and the drawn samples it could not use."""

    name: str
    patches: Rows[ScoredPatch]
    rejected: Rows[SampleRef]
    reasons: np.ndarray  # one per rejected sample

    def to_bytes(self) -> bytes:
        return npz_bytes(patches=self.patches.array, rejected=self.rejected.array,
                         reasons=np.asarray(self.reasons, dtype="U"))

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> ScoreUnit | None:
        arrays = npz_arrays(data)
        if arrays is None or set(arrays) != {"patches", "rejected", "reasons"}:
            return None
        return cls(name, Rows(PatchRows, arrays["patches"]), Rows(SampleRows, arrays["rejected"]), arrays["reasons"])


def decode_crop_score(run: Run, drawn: Rows[SampleRef], scorer: Scorer, window: Callable,
                      order: Callable) -> tuple[dict[Any, Sequence[ScoredPatch]], int, list[str]]:
    """Decode + crop K candidates per drawn image, score them, keep each image's best, and keep each
    class's best N x IPC in a top-k. Work is committed per input shard (a ScoreUnit); a resumed run takes a
    committed shard's key patches from its unit instead of scoring it again. Returns (this rank's per-class
    top-k, images scored by all ranks, this rank's unit names in reading order)."""
    cfg, runtime = run.job.distill, run.job.runtime
    # numpy rows, like the draw: at ImageNet scale the ranking holds up to 300,000 scored patches
    ranking: PerClassTopK[ScoredPatch] = PerClassTopK(cfg.patches_per_image * cfg.ipc, order=order,
                                                      class_of=lambda p: p.label, codec=PatchRows)
    cutter = run.cutter(cfg.crops)
    bar = run.progress(len(drawn), "scoring")
    scored, units = 0, []
    # `drawn` is in (shard name, offset) order, so a streamed shard is one forward pass here
    fetch = MemberFetcher(run.shards, run.stream_spool, run.ranks.rank, run.streams)
    shard_of = drawn.array["shard"]
    bounds = np.flatnonzero(np.diff(shard_of)) + 1 if len(shard_of) else np.zeros(0, np.int64)
    try:
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(drawn)]):
            if lo == hi:
                continue
            shard = run.shards[int(shard_of[lo])]
            name = f"score/p{int(run.position[shard_of[lo]]):06d}.r{run.ranks.rank}.npz"
            units.append(name)
            lost_path = run.checkpoint.path(name.replace(".npz", ".broken.json"))  # its fetch-pass break, if any
            data = run.checkpoint.load(name, "score_shards")
            unit = ScoreUnit.from_bytes(name, data) if data is not None else None
            if data is not None and (unit is None or (shard.url is not None and not spool_is_whole(
                    run.stream_spool, run.ranks.rank, int(shard_of[lo])))):  # damaged, or its winners' spool is
                run.checkpoint.discard(name, "score_shards")                   # gone: redo it
                unit = None
            if unit is None:
                lost_path.unlink(missing_ok=True)
                patches, rejected = [], []
                for start in range(lo, hi, runtime.batch_size):
                    batch = drawn[start:min(start + runtime.batch_size, hi)]
                    best, bad = _score_batch(run, batch, fetch, cutter, scorer, window, ranking)
                    patches += best
                    rejected += bad
                    bar.update(len(batch))
                fetch.spool.seal(int(shard_of[lo]))  # its spooled winners are durable before its unit is committed
                if int(shard_of[lo]) in fetch.breaks:  # data.broken_shards = "skip": say where and why
                    lost = [r.key for r, why in rejected if why == "corrupt_shard"]
                    cause = unnamed(fetch.breaks[int(shard_of[lo])][1], shard)
                    save_fetch_break(lost_path, lost[0] if lost else "", cause, len(lost))
                unit = ScoreUnit(name, Rows.of(PatchRows, patches, order), Rows.of(SampleRows, [r for r, _ in rejected],
                                                                                    order=lambda r: (0, r.key)),
                                 np.asarray([why for _, why in rejected], dtype="U"))
                run.checkpoint.commit(name, unit.to_bytes(), "score_shards")
            else:
                ranking.push_all(unit.patches)
                bar.update(hi - lo)
            if (lost := load_fetch_break(lost_path)) is not None:
                run.streams.note_broken(shard.name, "fetch", lost["at"], lost["cause"], lost["samples"])
            scored += len(unit.patches)
    finally:
        fetch.close()  # the spool is complete before the ranks merge their winners
    bar.close()
    local_winners, _ = ranking.finish()
    return local_winners, sum(run.ranks.gather(scored)), units


def _score_batch(run: Run, batch: list[SampleRef], fetch: MemberFetcher, cutter: Cutter, scorer: Scorer,
                 window: Callable, ranking: PerClassTopK[ScoredPatch]
                 ) -> tuple[list[ScoredPatch], list[tuple[SampleRef, str]]]:
    """Decode, crop and score one batch of drawn images into the per-class top-k; returns the batch's key
    patches and the samples it could not use, with the reason."""
    cfg, runtime = run.job.distill, run.job.runtime

    def read(r: SampleRef) -> bytes:
        try:
            return fetch(r.shard, r.offset, r.size)
        except StreamBroken as e:  # "skip": the sample is counted as corrupt_shard; "fail": the run ends
            if run.job.data.broken_shards == "fail":
                raise fetch_break(run.shards[r.shard], r.key, str(e)) from None
            raise

    with run.timings.stage("decode_crop", len(batch)):
        candidates, rejected = cut_candidates(
            batch, read, cutter,
            seed=cfg.seed, crops=cfg.crops, patch_size=cfg.patch_size, window=window,
            max_pixels=runtime.max_pixels)
    with run.timings.stage("score", len(candidates.images) * cfg.crops, unit="patches"):
        best = key_patches(candidates, scorer)
    with run.timings.stage("heap", len(best)):
        dropped = set()
        for patch in best:
            for d in ranking.push(patch):
                dropped.add((d.shard, d.offset))
    # only a patch still in the top-k can become a winner: spool its bytes (streamed shards), and those of the
    # images sampled for the data's BN statistics (read after scoring: a stream is not read a third time)
    kept = [(p.shard, p.offset) for p in best if (p.shard, p.offset) not in dropped]
    fetch.keep(dict.fromkeys(kept + [(r.shard, r.offset) for r in batch if (r.shard, r.offset) in run.bn_sample]))
    return best, rejected


def merged_winners(run: Run, local: dict[Any, Rows[ScoredPatch]], order: Callable) -> dict[Any, Rows[ScoredPatch]]:
    """Every rank's winners merged, kept as numpy rows: at ImageNet scale 200,000 patches."""
    merged = run.ranks.merge_top(local, run.job.distill.patches_per_image * run.job.distill.ipc, order)
    if run.ranks.world == 1:  # this rank's own rows
        return merged
    return {c: Rows.of(PatchRows, patches, order) for c, patches in merged.items()}


def record_scored(run: Run, plan: list[PlannedImage], winners: dict[Any, Sequence[ScoredPatch]],
                  units: list[str]) -> None:
    """The ledger rows of every drawn sample this rank read, from its committed score units: distilled when
    an image uses its key patch, else scored; or skipped with the reason it could not be used."""
    used = []
    for image in plan:
        for r in image.ranks:
            p = winners[image.label][r]
            used.append((p.shard << 40) | p.offset)
    used_ids = np.unique(np.asarray(used, np.int64))
    for name in units:
        unit = ScoreUnit.from_bytes(name, run.checkpoint.path(name).read_bytes())
        rows = unit.patches.array
        distilled = np.isin((rows["shard"].astype(np.int64) << 40) | rows["offset"], used_ids)
        for patch, is_used in zip(unit.patches, distilled.tolist()):
            run.record(patch, DISTILLED if is_used else SCORED)
        for ref, reason in zip(unit.rejected, unit.reasons.tolist()):
            run.record(ref, SKIPPED, reason)
    run.ledger.close()


def describe_observer(spec: ObserverConfig) -> str:
    """An observer in a record: its kind, architecture and weights file name."""
    return spec.kind + (f":{spec.arch}" if spec.arch else "") + (f" ({Path(spec.weights).name})" if spec.weights else "")


def refine_observer_names(job: JobConfig) -> list[str]:
    return [describe_observer(spec) for spec in job.refine.observers or [job.observer]]


def make_refiner(run: Run, observer: Observer) -> Refiner:
    """The refine stage's observers (the job's when refine.observers is empty), checked for BN layers now,
    before any data is read."""
    cfg = run.job.refine
    compute = replace(run.compute, precision=refinement_precision(run.job.runtime.precision, run.device))
    observers = [replace(observer, compute=compute)] if not cfg.observers else [
        build_observer(run.job, run.classes, compute, spec) for spec in cfg.observers]
    return Refiner(cfg, observers, refine_observer_names(run.job), seed=run.job.distill.seed,
                   resolution=run.job.distill.resolution)


def bn_stats_sample(run: Run, drawn: Rows[SampleRef]) -> dict[tuple[int, int], SampleRef]:
    """refine.bn_stats = "data": the images whose BN statistics the refinement matches, the first
    `bn_stats_images` drawn in the keyed draw order (of every rank's draw: the single-process sample); else none."""
    cfg = run.job.refine
    if not (cfg.enabled and cfg.bn_stats == "data" and cfg.bn_weight > 0):  # bn_weight 0: no BN term to match
        return {}
    seed, n = run.job.distill.seed, cfg.bn_stats_images
    sample = first_drawn(run.ranks.gather(first_drawn([drawn], seed, n)), seed, n)
    return {(r.shard, r.offset): r for r in sample}


def use_data_statistics(run: Run, refiner: Refiner) -> None:
    """refine.bn_stats = "data": the sample's BN statistics, measured once by the main rank and committed (a
    resumed run takes the committed ones), given to every rank's refiner; their summary is kept for the
    manifest."""
    if not run.bn_sample:
        return

    def recorded_or_measured() -> bytes:
        data = run.checkpoint.load(BN_STATS_FILE, "bn_stats")
        found = DataStatistics.from_bytes(data) if data is not None else None
        if found is not None and (found.observers, found.layers) == (refiner.names, refiner.layer_names()):
            try:
                refiner.use_statistics(found.stats)
                return data
            except ValueError:
                pass
        if data is not None:  # damaged, or of other layers: measured again
            run.checkpoint.discard(BN_STATS_FILE, "bn_stats")
        with run.timings.stage("bn_stats", len(run.bn_sample)):
            stats = measure(refiner, list(run.bn_sample.values()), lambda r: run.winners(r.shard, r.offset, r.size),
                            run.cutter(1), seed=run.job.distill.seed, max_pixels=run.job.runtime.max_pixels)
        data = stats.to_bytes()
        run.checkpoint.commit(BN_STATS_FILE, data, "bn_stats")
        return data

    data = on_main_rank(run.ranks, recorded_or_measured)
    stats = DataStatistics.from_bytes(data)
    refiner.use_statistics(stats.stats)
    run.bn_stats = stats.summary(hashlib.sha256(data).hexdigest())
    if run.ranks.is_main:
        log(f"refine: BN statistics of {stats.images} sampled train images at {stats.resolution} px "
            f"({sum(map(len, stats.layers))} BN layers; sha256 {run.bn_stats['sha256'][:12]})")


def refine_images(run: Run, plan: list[PlannedImage], refiner: Refiner) -> Spool:
    """Refine every planned image, a batch per image index (image j of every class, so tiers stay exact);
    this rank takes the batches j = rank (mod world). The refined images wait in a spool for the writer."""
    cfg = run.job.distill
    use_data_statistics(run, refiner)
    spool = Spool(run.layout.refined)
    batches: dict[int, list[PlannedImage]] = {}
    for image in plan:
        batches.setdefault(image.image_index, []).append(image)
    cutter = run.cutter(1)
    bar = run.progress(len(plan), "refining")
    for j in sorted(batches):
        if j % run.ranks.world != run.ranks.rank:
            continue
        images = batches[j]
        if spool.has_batch(j, [image.key for image in images]):  # committed by an earlier attempt
            run.checkpoint.reused["refine_batches"] += 1
            bar.update(len(images))
            continue
        with run.timings.stage("refine", len(images)):
            canvases = np.stack(cut_canvases(images, run.shards, cfg.resolution, cfg.factor, cutter,
                                              read=run.read_winner))
            refined, record = refiner.refine(canvases, [im.label for im in images], j)
        for image, pixels in zip(images, refined):
            spool.put(image.key, pixels)
        spool.put_record(record)  # last: the batch's commit
        run.checkpoint.computed["refine_batches"] += 1
        event()
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
    them, and label each shard's images from their stored bytes; each output shard is a committed unit,
    which a resumed run takes as it is (its files checked against their sha256). Returns every rank's
    results, merged."""
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
    parts, stats = [], []
    bar = run.progress(len(plan), "writing + relabelling" if relabeler else "writing")
    relabel_seconds, written_images, started = 0.0, 0, time.perf_counter()
    for shard_no, chunk in enumerate(output_shards(plan, out.shard_size)):
        if not run.ranks.owns_output(shard_no):
            continue
        unit = load_output_unit(run, shard_no)
        if unit is not None:
            parts.append(unit[0])
            stats.append(unit[1])
            bar.update(len(chunk))
            continue
        part, shard_stats = WriteResult(), LabelStats()
        samples = stitch(chunk, run.shards, run.class_names, settings, cutter, part, run.read_winner,
                         on_image=bar.update if relabeler is None else lambda n: None, refined=refined)
        record = write_image_shard(run.staging, shard_no, chunk[0].tier, samples)
        if relabeler is not None:
            t0 = time.perf_counter()
            record.labels = write_label_shard(run.staging, shard_no, samples, out.image_format, relabeler,
                                              shard_stats, on_image=bar.update)
            relabel_seconds += time.perf_counter() - t0
        part.shards.append(record)
        commit_output_unit(run, shard_no, part, shard_stats)
        parts.append(part)
        stats.append(shard_stats)
        written_images += len(chunk)
    bar.close()
    run.timings.add("stitch_write", time.perf_counter() - started - relabel_seconds, written_images)
    if relabeler is not None:
        run.timings.add("relabel", relabel_seconds, written_images * (relabeler.views + cfg.patches_per_image),
                        unit="labels")
    gathered = run.ranks.gather((merge_results(parts), LabelStats.merge(stats)))
    return merge_results([g[0] for g in gathered]), LabelStats.merge([g[1] for g in gathered])


def _output_unit_name(shard_no: int) -> str:
    return f"out/{shard_no:06d}"


def commit_output_unit(run: Run, shard_no: int, part: WriteResult, stats: LabelStats) -> None:
    """An output shard's record, counts, thumbnails and label statistics; committed after its files."""
    name = _output_unit_name(shard_no)
    keys = sorted(part.thumbnails)
    run.checkpoint.commit(f"{name}.npz", npz_bytes(
        keys=np.asarray(keys, np.int64).reshape(-1, 2),
        thumbnails=np.stack([part.thumbnails[k] for k in keys]) if keys else np.zeros((0, 1, 1, 3), np.uint8)),
        "output_thumbnails")
    record = {"shard": asdict(part.shards[0]), "images_per_class": sorted(part.images_per_class.items()),
              "kl_sums": sorted(stats.kl_sums.items()), "label_count": stats.count}
    run.checkpoint.commit(f"{name}.json", json.dumps(record).encode(), "output_shards")


def load_output_unit(run: Run, shard_no: int) -> tuple[WriteResult, LabelStats] | None:
    """A committed output shard, when its unit and files are whole (checked by sha256); else None (redo)."""
    name = _output_unit_name(shard_no)
    data = run.checkpoint.load(f"{name}.json", "output_shards")
    if data is None:
        return None
    try:
        record = json.loads(data)
        shard = ShardRecord(**record["shard"])
        arrays = npz_arrays(run.checkpoint.path(f"{name}.npz").read_bytes())
        files = [(shard.name, shard.sha256)] + ([(shard.labels["name"], shard.labels["sha256"])] if shard.labels else [])
        whole = arrays is not None and all(sha256_file(run.staging / f) == sha for f, sha in files)
    except (OSError, ValueError, KeyError, TypeError):
        whole = False
    if not whole:
        run.checkpoint.discard(f"{name}.json", "output_shards")
        return None
    part = WriteResult(shards=[shard], images_per_class={int(c): int(n) for c, n in record["images_per_class"]},
                       thumbnails={(int(c), int(j)): t for (c, j), t in zip(arrays["keys"].tolist(), arrays["thumbnails"])})
    return part, LabelStats({float(t): v for t, v in record["kl_sums"]}, record["label_count"])


def finish(run: Run, result: WriteResult, label_stats: LabelStats, relabeler: Relabeler | None,
           drawn_count: dict[int, int], scored: int, spool: Spool | None = None) -> Summary:
    """The run's records (manifest, report, ledger, contact sheet), written by the main rank and published
    (rded.staging); every rank waits for the publish and ends with its outcome."""
    ranks = run.ranks
    checkpoints = ranks.gather(run.checkpoint)
    accounting = (assemble_ledger(sorted(run.ledger_dir.glob("*.tsv")), run.staging / "samples.tsv")
                  if ranks.is_main else None)  # every rank's parts are closed: the gather above waits for them
    accounting = ranks.gather(accounting)[0]
    broken = broken_shards(run)  # collectives: every rank takes part
    streams = StreamStats.merge(ranks.gather(run.streams.stats)).as_dict()
    per_class = {c: result.images_per_class.get(c, 0) for c in sorted(run.wanted)}
    summary = Summary(run.out_dir, sum(s.samples for s in result.shards), len(result.shards), len(run.wanted),
                      scored, sum(accounting[SKIPPED].values()), time.perf_counter() - run.started,
                      sum(1 for n in per_class.values() if n), len(broken))
    if broken and ranks.is_main:
        log(f"warning: {len(broken)} input shards broke off and were skipped (data.broken_shards = \"skip\"): "
            + "; ".join(f"{b['shard']} ({b['pass']} pass, at {b['at']}: {b['cause']}; {b['samples']} rows)"
                        for b in broken[:5]) + ("; ..." if len(broken) > 5 else ""))

    def publish() -> str:
        publish_step()
        manifest = build_manifest(run, result, label_stats, relabeler, drawn_count, per_class, spool)
        manifest.broken_shards = broken or None
        write_contact_sheet(run.staging / "contact-sheet.png", result.thumbnails)
        write_report(run, summary, accounting, {"checkpoint": Checkpoint.report(checkpoints), "streams": streams},
                     per_class, manifest)
        write_cards(run.staging, manifest)  # README.md (a Hugging Face dataset card) and _info.json (timm's split file)
        if run.bn_stats:  # the statistics refinement matched, beside the manifest that records their sha256
            write_bytes_atomic(run.staging / BN_STATS_FILE, run.checkpoint.load(BN_STATS_FILE, "bn_stats"))
        run.layout.publish(manifest)
        return "published"

    on_main_rank(ranks, publish)
    return summary


def build_manifest(run: Run, result: WriteResult, label_stats: LabelStats, relabeler: Relabeler | None,
                   drawn_count: dict[int, int], per_class: dict[int, int], spool: Spool | None) -> Manifest:
    cfg = run.job.distill
    # the same bytes on any rank count; the code digest pins unfinished work only (a finished run is pinned by
    # the versions, so that a release that changes nothing else does not refuse it)
    identity = {k: v for k, v in run.identity.items() if k not in ("ranks", "code_sha256")}
    manifest = Manifest(
        format=MANIFEST_FORMAT, versions=versions(), job=without_attempt_settings(run.job.public_dict()),
        device=run.device.type,
        decoder=run.decoder, precision=run.compute.precision, ipc=cfg.ipc, tiers=cfg.tiers,
        images=sum(s.samples for s in result.shards),
        classes=[ClassRecord(c, run.class_names[c], drawn_count.get(c, 0), n) for c, n in per_class.items()],
        shards=result.shards, identity=identity)
    if spool is not None:
        manifest.refine = {"settings": run.job.refine.model_dump(mode="json", exclude={"enabled", "observers"}
                                                                 | run.job.refine.unrecorded),
                           "observers": refine_observer_names(run.job),
                           "precision": refinement_precision(run.job.runtime.precision, run.device),
                           **({"bn_stats": run.bn_stats} if run.bn_stats else {}),
                           "batches": spool.records()}
    if relabeler is not None:
        manifest.labels = labels_summary(relabeler, label_stats, sum(s.bytes for s in result.shards),
                                         sum(s.labels["bytes"] for s in result.shards))
    return manifest


def write_report(run: Run, summary: Summary, accounting: dict[str, Any], attempt: dict[str, Any],
                 per_class: dict[int, int], manifest: Manifest) -> None:
    """report.json, and the notes on short and empty classes."""
    cfg = run.job.distill
    # a class with no samples is normal when the classes are an observer's 1,000 outputs and the data has a few
    empty = [run.class_names[c] for c, n in per_class.items() if n == 0]
    short = {run.class_names[c]: n for c, n in per_class.items() if 0 < n < cfg.ipc}
    if short:
        log(f"warning: {len(short)} classes have fewer than ipc={cfg.ipc} images (too few decodable samples): "
            + ", ".join(f"{k}: {v}" for k, v in list(short.items())[:10]))
    if empty:
        log(f"note: {len(empty)} of {len(per_class)} classes have no images (no decodable samples): "
            + ", ".join(empty[:10]) + (", ..." if len(empty) > 10 else ""))
    refine_report = None
    if manifest.refine is not None:
        stage = run.timings.stages.get("refine")
        refine_report = {"precision": manifest.refine["precision"],
                         "seconds_per_image": round(stage.seconds / stage.items, 4) if stage and stage.items else None,
                         "peak_gpu_mib": (round(torch.cuda.max_memory_allocated(run.device) / 2**20, 1)
                                          if run.device.type == "cuda" else None)}
        if run.bn_stats:
            refine_report["bn_stats"] = {k: run.bn_stats[k] for k in ("images", "resolution", "sha256")}
    seconds = summary.seconds
    write_json(run.staging / "report.json", {
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "device": run.device.type,
        "decoder": run.decoder,
        "compute": run.compute.record(),
        "runtime": run.job.runtime.model_dump(mode="json"),  # this attempt's, batch sizes and retries included
        "threads": torch.get_num_threads(),  # intra-op threads of this (main) process's model calls
        "ranks": run.ranks.world,
        "stages": run.timings.as_dict(),
        "accounting": accounting,
        "short_classes": short,
        "empty_classes": {"count": len(empty), "classes": empty},
        "end_to_end_images_per_s": round(summary.scored_images / seconds, 2) if seconds else None,
        **attempt,  # this attempt's checkpoint use (reused and computed units) and its streams' retries
        "broken_shards": manifest.broken_shards or [],
        **({"refine": refine_report} if refine_report else {}),
    })
