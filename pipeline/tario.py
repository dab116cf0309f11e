"""WebDataset tar files: one key rule, one walker that notices truncation, deterministic atomic writing.

We write tars ourselves rather than with webdataset's TarWriter because it writes a sample's members in
sorted extension order, which would change the bytes of every shard we have ever published.
Every tar we write has fixed metadata (mtime 0, uid/gid 0, mode 0444, USTAR), so the same samples give
the same bytes on any machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# WebDataset's key rule: the key is the member path up to the first dot of its base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by WebDataset's rule, or None for a name without one."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


# -- atomic files

def atomic_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.partial")


def fsync_dir(path: Path) -> None:
    """Make the names in a directory durable: a rename is only safe across a power loss once its directory
    is synced. (A no-op where directories cannot be opened, e.g. on some network file systems.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(src: Path, dst: Path) -> None:
    """os.replace, then the destination's directory synced."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def write_bytes_atomic(path: Path, data: bytes, before_rename: Callable[[], None] = lambda: None) -> None:
    """`data` written whole and synced under a temporary name, then renamed into place and the directory
    synced (`before_rename` runs in between: a test's kill point)."""
    tmp = atomic_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    before_rename()
    replace_durably(tmp, path)


def copy_atomic(src: Path, dst: Path, check: Callable[[str], None] = lambda sha256: None) -> None:
    """Copy a file into place atomically. `check` sees the sha256 of the bytes copied and may raise, before
    anything appears under `dst`."""
    tmp = atomic_path(dst)
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            for block in iter(lambda: fin.read(1 << 20), b""):
                h.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        check(h.hexdigest())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_durably(tmp, dst)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- writing

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
    replace_durably(tmp, path)
    return sha256_file(path)


# -- reading

def read_member(path: str | Path, offset: int, size: int) -> bytes:
    """The bytes of one tar member, given its data offset and size (from the source index)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


@dataclass(frozen=True, slots=True)
class Member:
    ext: str
    offset: int  # of the member's data in the file
    size: int
    data: bytes | None  # read only when asked for


@dataclass(frozen=True, slots=True)
class Sample:
    key: str
    members: list[Member]

    @property
    def offset(self) -> int:
        """Where the sample starts: its first member's data offset (tells apart two samples of one key)."""
        return self.members[0].offset


@dataclass(frozen=True, slots=True)
class BrokenAt:
    """The shard breaks off here; `key` names the sample (or place) where reading stopped: the sample it
    broke inside, `(after KEY)` when every sample came through but the end did not, `(start)`."""

    key: str
    cause: str = ""  # what was wrong, in words


def walk_samples(fileobj: BinaryIO, read: Callable[[str], bool] = lambda ext: True) -> Iterator[Sample | BrokenAt]:
    """Consecutive members sharing a key, as samples in file order; data is read for the extensions that
    `read` accepts. A shard that breaks off (truncated or corrupt) ends with one `BrokenAt`, and the
    sample it broke inside is not yielded; the complete samples before it are.

    `tarfile` stops silently at a broken header or at the end of the data, so the end is checked by hand: a
    member running past the end of the file, anything but zero padding after the last header, and the
    end-of-archive marker (two zero blocks), without which the tar is truncated however neatly it ends
    (e.g. exactly between two samples). A forward-only stream (`seekable()` false, see rded.streams) has no
    size to check against: it raises when data ends early, and is read to its end so that the source's
    verdict (exit status, Content-Length) is checked too.
    """
    file_size = fileobj.seek(0, os.SEEK_END) if fileobj.seekable() else None
    fileobj.seek(0)
    key: str | None = None
    members: list[Member] = []
    broken: BrokenAt | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for info in tar:
                split = split_name(info.name)
                if file_size is not None and info.offset_data + info.size > file_size:
                    broken = BrokenAt(split[0] if split else info.name,
                                      f"truncated: {info.name} runs past the end of the file (byte {file_size})")
                    break
                if not info.isfile() or split is None:
                    continue
                ext = split[1].lower()
                # a new key, or the same key with an extension it already has, starts a new sample
                # (webdataset calls the latter a duplicate file name; we keep both and let the caller decide)
                if split[0] != key or any(m.ext == ext for m in members):
                    if key is not None:
                        yield Sample(key, members)
                    key, members = split[0], []
                data = tar.extractfile(info).read() if read(ext) else None
                members.append(Member(ext, info.offset_data, info.size, data))
            else:
                after = f"(after {key})" if key is not None else "(start)"
                try:
                    why = _end_problem(fileobj, tar.offset)
                    if file_size is None:  # a stream: read to its end, where the source gives its verdict
                        while fileobj.read(1 << 20):
                            pass
                except OSError as e:
                    if file_size is not None:
                        raise
                    why = str(e)  # every sample came through; the source still failed
                if why is not None:
                    broken = BrokenAt(after, why)
    except (tarfile.TarError, OSError, EOFError) as e:
        broken = BrokenAt(key or "(start)", str(e) or type(e).__name__)
    if broken is not None:
        if key is not None and broken.key != key:
            yield Sample(key, members)
        yield broken
    elif key is not None:
        yield Sample(key, members)


def _end_problem(fileobj: BinaryIO, offset: int, limit: int = 1 << 20) -> str | None:
    """What is wrong with the end of a tar whose last header `tarfile` read ended at `offset`: non-zero
    bytes (a header it could not read), or no end-of-archive marker (two zero blocks); None when fine."""
    fileobj.seek(offset)
    marker = fileobj.read(2 * tarfile.BLOCKSIZE)
    if any(marker) or any(fileobj.read(limit)):
        return f"a damaged tar header or other data at byte {offset}"
    if len(marker) < 2 * tarfile.BLOCKSIZE:
        return f"truncated: the tar ends at byte {offset + len(marker)} without its end-of-archive blocks"
    return None


def read_samples(data: bytes, name: str) -> dict[str, dict[str, bytes]]:
    """A whole shard held in memory: key -> {extension: bytes}. A broken shard is an OSError naming it."""
    samples: dict[str, dict[str, bytes]] = {}
    for item in walk_samples(io.BytesIO(data)):
        if isinstance(item, BrokenAt):
            raise OSError(f"{name}: the tar file breaks off at {item.key}")
        samples[item.key] = {m.ext: m.data for m in item.members}
    return samples
