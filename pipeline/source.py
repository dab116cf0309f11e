"""Source: shard patterns -> sample references (key, class, where the image bytes live).

Only tar headers and the tiny `.cls` members are read here: image bytes stay on disk until a sample is
drawn, so the index pass costs one sequential header walk per shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from braceexpand import braceexpand

from .config import JobConfig
from .errors import JobError
from .records import ClassInfo, SampleRef, Shard, Skipped
from .tario import BrokenAt, walk_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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
    """One record per sample (consecutive members sharing a key), reading only headers and labels.

    A shard that breaks off (truncated or corrupt tar) ends with one `Skipped(reason='corrupt_shard')`
    naming the sample where reading stopped; the complete samples before it are kept.
    """
    with open(path, "rb") as f:
        for item in walk_samples(f, read=lambda ext: ext == "cls"):
            if isinstance(item, BrokenAt):
                yield Skipped(item.key, shard_index, "corrupt_shard")
                continue
            image = next((m for m in item.members if m.ext in IMAGE_EXTS), None)
            labels = [m.data for m in item.members if m.ext == "cls"]
            if image is None:
                yield Skipped(item.key, shard_index, "missing_image")
            elif not labels:
                yield Skipped(item.key, shard_index, "missing_label")
            else:
                try:
                    label = int(labels[-1].decode("ascii").strip())
                except (UnicodeDecodeError, ValueError):
                    yield Skipped(item.key, shard_index, "bad_label")
                    continue
                yield SampleRef(item.key, label, shard_index, image.offset, image.size)
