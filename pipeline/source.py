"""Source: shard patterns -> sample references (key, class, where the image bytes live).

Only tar headers and the tiny `.cls` members are read here: image bytes stay on disk until a sample is
drawn, so the index pass costs one sequential header walk per shard.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from .config import JobConfig, JobError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# WebDataset's own key rule: the key is the member path up to the first dot of its base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True, slots=True)
class Shard:
    name: str  # as written in the job (after brace expansion): machine-independent, goes into outputs
    path: Path  # where it is on this machine


@dataclass(frozen=True, slots=True)
class SampleRef:
    key: str
    label: int
    shard: int  # index into the job's shard list
    offset: int  # byte offset of the image member's data in the shard
    size: int  # byte size of the image member


@dataclass(frozen=True, slots=True)
class Skipped:
    key: str
    shard: int
    reason: str  # missing_image | missing_label | bad_label | unknown_class | corrupt_shard


@dataclass(frozen=True, slots=True)
class ClassInfo:
    index: int
    name: str
    imagenet_index: int | None = None


def expand_shards(job: JobConfig) -> list[Shard]:
    shards: list[Shard] = []
    for pattern in job.data.train:
        for name in braceexpand(pattern):
            shards.append(Shard(name=name, path=job.path(name)))
    missing = [s.name for s in shards if not s.path.is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise JobError(f"data.train: shard not found: {', '.join(missing[:5])}{more}")
    if len({s.path.resolve() for s in shards}) != len(shards):
        raise JobError("data.train: the same shard is listed twice")
    return shards


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


def scan_shard(shard_index: int, path: Path) -> Iterator[SampleRef | Skipped]:
    """Yield one record per sample (consecutive members sharing a key), reading only headers and labels.

    A shard that breaks off (truncated or corrupt tar) ends with one `Skipped(reason='corrupt_shard')`
    naming the sample where reading stopped; the complete samples before it are kept. `tarfile` stops
    silently at a broken header, so truncation is checked by hand: a member running past the end of the
    file, or anything but zero padding after the last header.
    """
    file_size = path.stat().st_size
    group_key: str | None = None
    image: tuple[int, int] | None = None
    label_bytes: bytes | None = None

    def flush() -> SampleRef | Skipped:
        if image is None:
            return Skipped(group_key, shard_index, "missing_image")
        if label_bytes is None:
            return Skipped(group_key, shard_index, "missing_label")
        try:
            label = int(label_bytes.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return Skipped(group_key, shard_index, "bad_label")
        return SampleRef(group_key, label, shard_index, image[0], image[1])

    broken_at: str | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                m = _KEY_EXT.match(member.name)
                if member.offset_data + member.size > file_size:
                    broken_at = m.group(1) if m else member.name
                    break
                if not member.isfile() or m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if key != group_key:
                    if group_key is not None:
                        yield flush()
                    group_key, image, label_bytes = key, None, None
                if ext in IMAGE_EXTS and image is None:
                    image = (member.offset_data, member.size)
                elif ext == "cls":
                    label_bytes = tar.extractfile(member).read()
            else:
                if _has_trailing_data(path, tar.offset):
                    broken_at = f"(after {group_key})"
    except (tarfile.TarError, OSError, EOFError):
        broken_at = group_key or "(start)"
    if broken_at is not None:
        if group_key is not None and broken_at != group_key:
            yield flush()
        yield Skipped(broken_at, shard_index, "corrupt_shard")
    elif group_key is not None:
        yield flush()


def _has_trailing_data(path: Path, offset: int, limit: int = 1 << 20) -> bool:
    """True when non-zero bytes follow the last member: a header tarfile could not read."""
    with open(path, "rb") as f:
        f.seek(offset)
        return any(f.read(limit))
