"""Source: shard patterns -> sample references (key, class, where the image bytes live).

Only tar headers and the tiny `.cls` members are read here: image bytes stay on disk until a sample is
drawn, so the index pass costs one sequential header walk per shard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from braceexpand import braceexpand

from .config import JobConfig
from .errors import JobError
from .keyed import keyed_u64
from .records import ClassInfo, SampleRef, Shard, Skipped
from .streams import open_shard
from .tario import BrokenAt, walk_samples

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


def scan_shard(shard_index: int, source: Shard | Path) -> Iterator[SampleRef | Skipped]:
    """One record per sample (consecutive members sharing a key), reading only headers and labels.

    A shard that breaks off (truncated or corrupt tar, a stream that fails, one that cannot be opened at
    all) ends with one `Skipped(reason='corrupt_shard')` naming the sample where reading stopped; the
    complete samples before it are kept.
    """
    with open_shard(source) as f:
        for item in walk_samples(f, read=lambda ext: ext == "cls"):
            if isinstance(item, BrokenAt):
                yield Skipped(item.key, shard_index, "corrupt_shard")
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


def shard_key_hashes(source: Shard | Path) -> np.ndarray:
    """The distinct key hashes of one shard (a header walk), for the ranks' exchange before indexing.
    (For a streamed shard this is one more read of it, made only by torchrun runs split by shard.)"""
    with open_shard(source) as f:
        hashes = {key_hash(item.key) for item in walk_samples(f, read=lambda ext: False)
                  if not isinstance(item, BrokenAt)}
    return np.fromiter(hashes, np.uint64, len(hashes))
