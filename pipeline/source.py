"""Source: shard patterns -> sample references (key, class, where the image bytes live).

Only tar headers and the tiny `.cls` members are read here: image bytes stay on disk until a sample is
drawn, so the index pass costs one sequential header walk per shard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from braceexpand import braceexpand

from .config import JobConfig
from .errors import InputUnavailable, JobError, RdedError
from .keyed import keyed_u64
from .records import ClassInfo, SampleRef, Shard, Skipped
from .streams import PASSES, Streams, open_shard
from .tario import BrokenAt, walk_samples, write_bytes_atomic

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def shard_location(job: JobConfig, name: str) -> Shard:
    """A shard as webdataset takes it: a local path, `file:` (relative to the job file, like paths),
    `http://` / `https://` (streamed) or `pipe:COMMAND` (the command's stdout, streamed)."""
    if name.startswith("pipe:"):
        return Shard(name, None, name)
    if name.startswith("file:"):
        rest = name[5:]
        return Shard(name, job.path(unquote(urlsplit(name).path) if rest.startswith("//") else rest))
    m = _SCHEME.match(name)
    if m is None:
        return Shard(name, job.path(name))
    if m.group(1).lower() in ("http", "https"):
        return Shard(name, None, name)
    raise JobError(f"data.train: {name}: unsupported URL scheme {m.group(1)!r} "
                   "(use a path, file:, http://, https:// or pipe:COMMAND)")


def expand_shards(job: JobConfig) -> list[Shard]:
    shards: list[Shard] = []
    for pattern in job.data.train:
        for name in braceexpand(pattern):
            shards.append(shard_location(job, name))
    local = [s for s in shards if s.url is None]
    missing = [s.name for s in local if not s.path.is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise JobError(f"data.train: shard not found: {', '.join(missing[:5])}{more}")
    # a URL cannot be checked cheaply up front: one that fails is a corrupt_shard when read
    if len({s.path.resolve() if s.url is None else s.url for s in shards}) != len(shards):
        raise JobError("data.train: the same shard is listed twice")
    return [replace(s, output_name=n) for s, n in zip(shards, output_names([s.name for s in shards]))]


def output_names(names: Sequence[str]) -> list[str]:
    """The shards' names in the outputs: their file names (the last `/` part, without a URL's query) when
    those differ from each other, else the names from the first `/` part where they differ. So the same
    shards read from a local path, `file:`, `http(s)://` or `pipe:cat` give byte-identical distilled
    shards, and a run's images do not record where its input happened to sit."""
    parts = [(urlsplit(n).path if _SCHEME.match(n) else n).split("/") for n in names]
    if len({p[-1] for p in parts}) == len(parts):
        return [p[-1] for p in parts]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def load_classes(job: JobConfig) -> list[ClassInfo] | None:
    if job.data.classes is None:
        return None
    path = job.path(job.data.classes)
    if not path.is_file():
        raise JobError(f"data.classes: file not found: {path}")
    try:
        entries = json.loads(path.read_text())
        classes = [ClassInfo(int(e["index"]), str(e.get("name", e["index"])),
                             None if e.get("imagenet_index") is None else int(e["imagenet_index"]))
                   for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise JobError(f"data.classes: {path}: expected a JSON list of {{index, name, imagenet_index}}: {e}") from None
    if sorted(c.index for c in classes) != list(range(len(classes))):
        raise JobError(f"data.classes: {path}: class indices must be 0..{len(classes) - 1}, each once")
    return sorted(classes, key=lambda c: c.index)


@dataclass(frozen=True, slots=True)
class BrokenShard(Skipped):
    """The record that ends a shard that broke off (reason corrupt_shard): `key` says where, `cause` why."""

    cause: str = ""


@dataclass(frozen=True, slots=True)
class Replay:
    """A break an earlier attempt of the run recorded: after `records` records the shard ends there, whatever
    this attempt would read, so a resumed run indexes what the first attempt did."""

    records: int
    at: str
    cause: str


def scan_shard(shard_index: int, source: Shard | Path, streams: Streams | None = None,
               replay: Replay | None = None) -> Iterator[SampleRef | Skipped]:
    """One record per sample (consecutive members sharing a key), reading only headers and labels.

    A shard that breaks off (truncated or corrupt tar, a stream that fails after its retries, one that cannot
    be opened at all) ends with one `BrokenShard(reason='corrupt_shard')` naming the sample where reading
    stopped; the complete samples before it are kept. With `replay`, the shard ends as recorded (and the
    rest is not read) unless it breaks off sooner.
    """
    if replay is not None and replay.records == 0:  # nothing to read again
        yield BrokenShard(replay.at, shard_index, "corrupt_shard", cause=replay.cause)
        return
    with open_shard(source, streams) as f:
        for n, item in enumerate(walk_samples(f, read=lambda ext: ext == "cls")):
            if replay is not None and n == replay.records:
                yield BrokenShard(replay.at, shard_index, "corrupt_shard", cause=replay.cause)
                return
            if isinstance(item, BrokenAt):
                yield BrokenShard(item.key, shard_index, "corrupt_shard", cause=unnamed(item.cause, source))
                continue
            image = next((m for m in item.members if m.ext in IMAGE_EXTS), None)
            label = next((m.data for m in item.members if m.ext == "cls"), None)
            if image is None:
                yield Skipped(item.key, shard_index, "missing_image", item.offset)
            elif label is None:
                yield Skipped(item.key, shard_index, "missing_label", item.offset)
            elif (value := parse_label(label)) is None:
                yield Skipped(item.key, shard_index, "bad_label", item.offset)
            else:
                yield SampleRef(item.key, value, shard_index, image.offset, image.size)


def index_break(shard: Shard, broken: BrokenShard, records: int, before: dict[str, Any] | None, policy: str,
                where: Path) -> RdedError | None:
    """What a shard that broke off in the index pass after `records` records means for the run: None (it is
    counted: data.broken_shards = "skip", or it is the break the first attempt recorded) or the error that
    ends the run. `before`: the first attempt's entry for the shard (rded.checkpoint.IndexDigest), on resume."""
    if before is not None:
        then = before.get("broken")
        if then is not None and then["records"] == records and then["at"] == broken.key:
            return None
        how = "whole" if then is None else f"up to {then['at']}"
        if shard.url is not None:
            return InputUnavailable(
                f"data.train: {shard.name}: the stream broke off at {broken.key} in the index pass ({broken.cause}); "
                f"the run's first attempt read it {how}. The committed work is kept: rerun with --resume when the "
                "source is back")
        return JobError(f"--resume: the input shards changed since the unfinished run in {where} started: "
                        f"{shard.name} now breaks off at {broken.key} ({broken.cause}); the first attempt read it "
                        f"{how}. Its work is kept. Restore the shard, or pass --overwrite to start afresh")
    if policy == "skip":
        return None
    if shard.url is not None:
        return InputUnavailable(
            f"data.train: {shard.name}: the stream broke off at {broken.key} in the index pass: {broken.cause}; "
            "the committed work is kept: rerun with --resume when the source is back, or set "
            'data.broken_shards = "skip" to count its samples as skipped')
    return JobError(f"data.train: {shard.name}: the tar file breaks off at {broken.key}: {broken.cause} (a truncated "
                    "or corrupt file: no retry can fix it); replace it, or set data.broken_shards = \"skip\" to "
                    "count its samples as skipped")


def unnamed(message: str, source: Shard | Path) -> str:
    """A stream's error message without the shard's name in front (the caller names it)."""
    name = f"{source.url}: " if isinstance(source, Shard) and source.url else ""
    return message[len(name):] if name and message.startswith(name) else message


def save_fetch_break(path: Path, at: str, cause: str, samples: int) -> None:
    """A shard's fetch-pass break (data.broken_shards = "skip"), kept beside its score unit, before it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps({"at": at, "cause": cause, "samples": samples}).encode())


def load_fetch_break(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fetch_break(shard: Shard, key: str, cause: str) -> InputUnavailable:
    """The error of a stream that broke off in the second pass (data.broken_shards = "fail")."""
    return InputUnavailable(
        f"data.train: {shard.name}: the stream broke off in the second pass, fetching {key}: {unnamed(cause, shard)}; "
        "the committed work is kept: rerun with --resume when the source is back, or set "
        'data.broken_shards = "skip" to count its samples as skipped')


def broken_shards(run: Any) -> list[dict[str, Any]]:
    """Every input shard that broke off and was counted as skipped (data.broken_shards = "skip"), every rank's
    (a collective: call it on every rank), in shard-name order, the index pass before the fetch pass. Each is
    {"shard": its name as the job wrote it, "pass": "index" | "fetch", "at": where it stopped (the sample
    it broke inside, "(after KEY)", "(start)"), "cause": why, "samples": its rows of corrupt_shard}."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for part in run.ranks.gather(list(run.streams.broken.values())):
        for b in part:
            k = (b["shard"], b["pass"])
            if k not in merged:
                merged[k] = dict(b)
            elif b["pass"] == "fetch":  # each rank lost its own drawn samples of the shard
                merged[k]["samples"] += b["samples"]
    return sorted(merged.values(), key=lambda b: (b["shard"], PASSES.index(b["pass"])))


_LABEL = re.compile(rb"[ \t\r\n]*(-?[0-9]+)[ \t\r\n]*")


def parse_label(data: bytes) -> int | None:
    """A `.cls` member: ASCII decimal digits with an optional leading '-', optionally surrounded by ASCII
    spaces, tabs or line breaks (a trailing newline is common). Anything else (underscores, '+', other
    scripts' digits, several numbers) is not a label."""
    m = _LABEL.fullmatch(data)
    return int(m.group(1)) if m else None


def canonical_order(shards: Sequence[Shard]) -> list[int]:
    """Shard indices by name: the order that decides which copy of a repeated key is the sample, whatever
    order the job lists its shards in."""
    return sorted(range(len(shards)), key=lambda i: shards[i].name)


def key_hash(key: str) -> int:
    return keyed_u64(0, "sample-key", key)


class FirstOccurrence:
    """Which occurrence of a key is the sample: within a shard the first; across shards, the one in the
    shard that comes first in canonical order (by name). Every other occurrence is a duplicate.

    Shards are offered in canonical order (`next_shard` with each one's position). Memory: the 64-bit
    hashes of earlier shards' keys in one sorted numpy array (8 bytes per key: 10 MB for ImageNet-1K's
    1.28 M samples, where a Python set would take 75 MB), and a set for the shard being read; each shard's
    keys are merged in when the next starts (linear, no re-sort). Two different keys share a hash with
    probability about n^2 / 2^65. Under torchrun, `shard_keys` holds every shard's key hashes (from all
    ranks), so a rank also knows the keys of earlier shards it does not read.
    """

    def __init__(self, shard_keys: dict[int, np.ndarray] | None = None):
        self._table = dict(shard_keys or {})  # canonical position -> the shard's distinct key hashes
        self._earlier = np.zeros(0, np.uint64)  # sorted hashes of the keys of earlier shards
        self._current: set[int] = set()  # keys of this shard so far

    def next_shard(self, position: int) -> None:
        parts = [self._table.pop(p) for p in sorted(p for p in self._table if p < position)]
        if self._current:
            parts.append(np.fromiter(self._current, np.uint64, len(self._current)))
            self._current = set()
        if parts:
            new = np.unique(np.concatenate(parts))
            self._earlier = np.insert(self._earlier, np.searchsorted(self._earlier, new), new)

    def is_first(self, key: str) -> bool:
        h = key_hash(key)
        if h in self._current:
            return False
        i = int(np.searchsorted(self._earlier, np.uint64(h)))
        if i < len(self._earlier) and int(self._earlier[i]) == h:
            return False
        self._current.add(h)
        return True


def shard_key_hashes(source: Shard | Path, streams: Streams | None = None, replay: Replay | None = None) -> np.ndarray:
    """The distinct key hashes of one shard (a header walk), for the ranks' exchange before indexing; up to
    where it breaks off (or `replay` says it does). (For a streamed shard this is one more read of it, made
    only by torchrun runs split by shard.)"""
    hashes: set[int] = set()
    if replay is not None and replay.records == 0:
        return np.zeros(0, np.uint64)
    with open_shard(source, streams) as f:
        for n, item in enumerate(walk_samples(f, read=lambda ext: False)):
            if isinstance(item, BrokenAt) or (replay is not None and n == replay.records):
                break
            hashes.add(key_hash(item.key))
    return np.fromiter(hashes, np.uint64, len(hashes))
