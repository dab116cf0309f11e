"""The run directory, in one place: its typed manifest, shard names, staging and atomic publish, the
replacement of a previous run, slicing, and sha256 verification whenever a run is read.

A run directory holds `distilled-NNNNNN.tar` image shards, `labels-NNNNNN.tar` soft-label shards beside
them, `samples.tsv`, `report.json`, `contact-sheet.png` and, written last, `manifest.json`: a directory
with a manifest is a finished run. Everything is made in a staging folder inside the output directory
and moved into place at the end (rded.staging). Imports only the standard library (the loader reads runs through it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .cards import CARD_FILES, write_cards
from .errors import OutputExists, RunError
from .tario import copy_atomic, read_samples, sha256_file, write_bytes_atomic

FORMAT_NAME = "rded-distilled"
FORMAT_VERSION = 1  # the newest this code reads and the one it writes
MANIFEST_FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
MANIFEST = "manifest.json"
STAGING = ".rded-staging"
RECORDS = ("report.json", "samples.tsv", "contact-sheet.png")  # a run's files besides shards and manifest
BN_STATS = "bn_stats.json"  # refine.bn_stats = "data": the statistics refinement matched (rded.bnstats)


def image_shard_name(shard_no: int) -> str:
    return f"distilled-{shard_no:06d}.tar"


def label_shard_name(shard_no: int) -> str:
    return f"labels-{shard_no:06d}.tar"


@dataclass
class ShardRecord:
    """One image shard of the run, and the soft-label shard of the same samples (None without relabel)."""

    name: str
    tier: int
    samples: int
    bytes: int
    sha256: str
    labels: dict[str, Any] | None = None  # {name, bytes, sha256}


@dataclass
class ClassRecord:
    index: int
    name: str
    drawn: int
    images: int


@dataclass
class Manifest:
    format: str
    versions: dict[str, str]
    job: dict[str, Any]  # the job's configuration, as validated
    device: str
    decoder: str
    ipc: int
    tiers: list[int]
    images: int
    classes: list[ClassRecord]
    shards: list[ShardRecord]
    labels: dict[str, Any] | None = None  # soft-label format, size and fidelity; None without relabel
    sliced_from: dict[str, Any] | None = None  # {ipc, tiers} of the run a slice was cut from
    refine: dict[str, Any] | None = None  # settings, observers and per-batch stage records; None unrefined
    precision: str | None = None  # of every model call (runtime.precision resolved); None: before it was recorded
    identity: dict[str, Any] | None = None  # rded.checkpoint.run_identity less the rank count; None: older runs
    broken_shards: list[dict[str, Any]] | None = None  # input shards skipped as broken (data.broken_shards = "skip")

    @property
    def resolution(self) -> int:
        return self.job["distill"]["resolution"]

    @property
    def image_format(self) -> str:
        return self.job["output"]["image_format"]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for optional in ("labels", "sliced_from", "refine", "precision", "identity", "broken_shards"):
            if d[optional] is None:
                del d[optional]
        return d

    @classmethod
    def from_json(cls, d: Any, where: Path) -> Manifest:
        if not isinstance(d, dict) or not isinstance(d.get("format"), str):
            raise RunError(f"{where}: not an rded manifest (no format)")
        name, _, version = d["format"].partition("/")
        if name != FORMAT_NAME or not version.isdigit():
            raise RunError(f"{where}: not an rded manifest (format {d['format']!r})")
        if int(version) > FORMAT_VERSION:
            raise RunError(f"{where}: format {d['format']} is newer than this rded reads ({MANIFEST_FORMAT}); "
                           "upgrade rded")
        missing = [f.name for f in fields(cls) if f.default is not None and f.name not in d]
        if missing:
            raise RunError(f"{where}: manifest lacks {', '.join(missing)}")
        try:
            return cls(**{**d, "classes": [ClassRecord(**c) for c in d["classes"]],
                          "shards": [ShardRecord(**s) for s in d["shards"]]})
        except TypeError as e:
            raise RunError(f"{where}: malformed manifest: {e}") from None


def write_json(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(run_dir: Path) -> Manifest:
    """The manifest of a finished run or slice, its format and version checked."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunError(f"{run_dir}: no {MANIFEST} (not a finished rded run)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON: {e}") from None
    return Manifest.from_json(data, path)


def _check_sha(run_dir: Path, name: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise RunError(f"{run_dir / name}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}... "
                       "(the shard was changed or damaged after the run)")


def _listed_file(run_dir: Path, name: str) -> Path:
    path = Path(run_dir) / name
    if not path.is_file():
        raise RunError(f"{path}: missing (listed in the manifest)")
    return path


def read_verified(run_dir: Path, name: str, sha256: str) -> dict[str, dict[str, bytes]]:
    """A shard of a run, read whole and checked against its recorded sha256: key -> {extension: bytes}."""
    path = _listed_file(run_dir, name)
    data = path.read_bytes()
    _check_sha(run_dir, name, hashlib.sha256(data).hexdigest(), sha256)
    try:
        return read_samples(data, str(path))
    except OSError as e:
        raise RunError(str(e)) from None


def verify_run(run_dir: Path, manifest: Manifest | None = None) -> Manifest:
    """Check every shard of a run (and its BN statistics, when recorded) against the manifest's sha256; the
    manifest."""
    manifest = manifest or read_manifest(run_dir)
    for name, sha in [f for shard in manifest.shards for f in _shard_files(shard)] + bn_stats_file(manifest):
        _check_sha(run_dir, name, sha256_file(_listed_file(run_dir, name)), sha)
    return manifest


def bn_stats_file(manifest: Manifest) -> list[tuple[str, str]]:
    """The recorded BN statistics file and its sha256, if the run refined against the data's statistics."""
    recorded = (manifest.refine or {}).get("bn_stats")
    return [(recorded["file"], recorded["sha256"])] if recorded else []


def _shard_files(shard: ShardRecord) -> list[tuple[str, str]]:
    files = [(shard.name, shard.sha256)]
    if shard.labels:
        files.append((shard.labels["name"], shard.labels["sha256"]))
    return files


# -- writing a run

def check_output(out_dir: Path, overwrite: bool) -> None:
    """Before any work: the output directory can take a run (a finished one only with `overwrite`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExists(f"{out_dir}: exists and is not a directory")
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise OutputExists(f"{out_dir}: holds a finished run ({MANIFEST})", finished_run=True)


def remove_previous_run(out_dir: Path) -> None:
    """Unmark a finished run first (its manifest), then remove its shards and records (rded.staging publishes
    the new one)."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for old in [*out_dir.glob("distilled-*.tar"), *out_dir.glob("labels-*.tar")]:
        old.unlink()
    for name in (*RECORDS, BN_STATS, *CARD_FILES):
        (out_dir / name).unlink(missing_ok=True)


def slice_run(src: Path, ipc: int, out_dir: Path, *, overwrite: bool = False) -> Manifest:
    """The IPC=`ipc` set of a finished run: its shards of tiers <= ipc, copied byte for byte (a tier
    always starts a shard) and checked against their sha256, and a manifest that says so. No model, no
    recomputation."""
    manifest = read_manifest(src)
    if ipc not in manifest.tiers:
        raise RunError(f"{src}: ipc {ipc} is not a tier of this run; its tiers are {manifest.tiers} "
                       "(set distill.slices when distilling to get others)")
    if out_dir.exists() and out_dir.resolve() == Path(src).resolve():
        raise RunError(f"{out_dir}: a slice cannot replace the run it is cut from")
    check_output(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_previous_run(out_dir)
    kept = [s for s in manifest.shards if s.tier <= ipc]
    for name, sha in [f for shard in kept for f in _shard_files(shard)] + bn_stats_file(manifest):
        copy_atomic(_listed_file(src, name), out_dir / name, check=lambda actual, name=name, sha=sha: _check_sha(src, name, actual, sha))
    sliced = replace(manifest, ipc=ipc, tiers=[t for t in manifest.tiers if t <= ipc], shards=kept,
                     images=sum(s.samples for s in kept),
                     sliced_from={"ipc": manifest.ipc, "tiers": manifest.tiers},
                     classes=[replace(c, images=min(c.images, ipc)) for c in manifest.classes])
    if manifest.refine is not None:  # the batches of the images kept
        sliced.refine = {**manifest.refine, "batches": [b for b in manifest.refine["batches"] if b["image_index"] < ipc]}
    write_cards(out_dir, sliced)  # the slice's own dataset card and timm split file, before the manifest commits it
    write_json(out_dir / MANIFEST, sliced.to_json())
    return sliced

