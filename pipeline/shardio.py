"""Deterministic, atomic WebDataset tar writing and random-access member reads.

Every tar we write has fixed metadata (mtime 0, uid/gid 0, mode 0444, USTAR), so the same samples give
the same bytes on any machine; webdataset's TarWriter stamps the current time, which would not.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path


def atomic_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.partial")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = atomic_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: Path, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> str:
    """Write samples (key, {ext: bytes}) as a WebDataset shard; members in the given order.

    Returns the sha256 of the finished file. The file appears under its name only when complete.
    """
    tmp = atomic_path(path)
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                for ext, data in members.items():
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    """The bytes of one tar member, given its data offset and size (from the source index)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
