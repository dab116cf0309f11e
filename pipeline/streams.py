"""Shards that are not local files: `http(s)://` URLs and `pipe:` commands, read as forward-only streams.

A stream cannot seek, so a streamed shard is read at most twice: the index pass (a header walk over the
whole stream) and one forward pass that fetches just the drawn samples' image bytes, in offset order.
The bytes of the samples that may still become winners are copied to a spool on local disk (under the
run's staging folder), so the writer and the refiner re-read winners from there, not from the source.
Local files keep the plain seek-by-offset path (`read_member`).
"""

from __future__ import annotations

import http.client
import io
import os
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .records import Shard
from .tario import read_member

TIMEOUT_S = 60  # per socket operation: a stalled server breaks the shard rather than hanging the job
LOOKBACK = 1 << 16  # bytes a stream can seek back (tarfile re-reads the header block it stopped at)
CHUNK = 1 << 20


class StreamBroken(OSError):
    """Reading a streamed shard failed: no connection, an HTTP error, a connection closed before
    Content-Length bytes, a `pipe:` command that exited non-zero, or data ending early."""


class ForwardStream:
    """A binary file-like object over a URL or `pipe:` command that reads forward only (seeking forward
    skips bytes; seeking back works within the last LOOKBACK bytes). Opened on the first read, so a
    failure to connect surfaces where the shard is read. At the end of the data the source's own verdict
    is checked (the HTTP Content-Length, the command's exit status) and a bad one raises StreamBroken."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S):
        self.name = url
        self._timeout = timeout
        self._raw = None
        self._proc: subprocess.Popen | None = None
        self._expected: int | None = None  # HTTP Content-Length
        self._raw_pos = 0  # bytes taken from the source
        self._hist = bytearray()  # the last bytes taken (for short seeks back)
        self._pos = 0  # the reader's position
        self._end: int | None = None  # the length, once the end was reached cleanly
        self._failed: str | None = None

    # -- file-like
    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence != os.SEEK_SET:
            raise io.UnsupportedOperation(f"{self.name}: a stream has no known end to seek from")
        if offset < self._raw_pos - len(self._hist):
            raise StreamBroken(f"{self.name}: cannot seek back to {offset} in a stream (at {self._raw_pos})")
        while offset > self._raw_pos and self._end is None:
            self._take(min(CHUNK, offset - self._raw_pos))
        self._pos = offset  # past the end, like a file: reads there give b""
        return offset

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        if self._pos < self._raw_pos:  # replay after a seek back
            start = len(self._hist) - (self._raw_pos - self._pos)
            out += self._hist[start:] if size < 0 else self._hist[start:start + size]
            self._pos += len(out)
        while (size < 0 or len(out) < size) and self._pos == self._raw_pos and self._end is None:
            block = self._take(CHUNK if size < 0 else size - len(out))
            out += block
            self._pos += len(block)
        return bytes(out)

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:  # stopped early on purpose: the command's verdict no longer matters
                self._proc.kill()
            self._proc.stdout.close()
            self._proc.wait()
            self._proc = None
        elif self._raw is not None:
            self._raw.close()
        self._raw = None

    def __enter__(self) -> ForwardStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the source
    def _open(self) -> None:
        if self.name.startswith("pipe:"):
            # the shell runs the command, as webdataset does; stderr goes to ours
            self._proc = subprocess.Popen(self.name[5:], shell=True, stdout=subprocess.PIPE)
            self._raw = self._proc.stdout
        else:
            try:
                self._raw = urllib.request.urlopen(self.name, timeout=self._timeout)
            except (OSError, http.client.HTTPException) as e:
                raise StreamBroken(f"{self.name}: {e}") from None
            self._expected = self._raw.length

    def _take(self, n: int) -> bytes:
        """Up to n bytes from the source (fewer only at its end); checks the source's verdict there."""
        if self._failed:
            raise StreamBroken(self._failed)
        try:
            if self._raw is None:
                self._open()
            block = self._raw.read(n)
            if not block:
                self._check_end()
        except StreamBroken as e:
            self._failed = str(e)
            raise
        except (OSError, ValueError, http.client.HTTPException) as e:
            self._failed = f"{self.name}: {type(e).__name__}: {e}"
            raise StreamBroken(self._failed) from None
        self._raw_pos += len(block)
        self._hist += block
        del self._hist[:-LOOKBACK]
        return block

    def _check_end(self) -> None:
        if self._proc is not None:
            status = self._proc.wait()
            if status != 0:
                raise StreamBroken(f"{self.name}: the command exited with status {status}")
        elif self._expected is not None and self._raw_pos != self._expected:
            raise StreamBroken(f"{self.name}: the connection closed after {self._raw_pos} of {self._expected} bytes")
        self._end = self._raw_pos


def open_shard(source: Shard | Path | str):
    """A shard's bytes as a binary file: a local file (seekable) or a ForwardStream."""
    if isinstance(source, Shard):
        return ForwardStream(source.url) if source.url is not None else open(source.path, "rb")
    return open(source, "rb")


class MemberFetcher:
    """The scoring pass's reads: `(shard index, offset, size) -> bytes`, asked in (shard, offset) order.

    Local shards: a seek per member. Streamed shards: one forward pass each, opened at the shard's first
    member and closed when the next shard starts (so a shard is never opened twice here); once broken, the
    shard's remaining members raise StreamBroken without another attempt. Fetched bytes wait in memory only
    until the caller says which to `keep` (spooled to disk for the writer) — one batch at a time.
    """

    def __init__(self, shards: Sequence[Shard], spool_dir: Path, rank: int = 0):
        self.shards = shards
        self.spool = MemberSpool(spool_dir, rank)
        self._current: int | None = None
        self._stream: ForwardStream | None = None
        self._broken: str | None = None
        self._pending: dict[tuple[int, int], bytes] = {}

    def __call__(self, shard_index: int, offset: int, size: int) -> bytes:
        shard = self.shards[shard_index]
        if shard.url is None:
            return read_member(shard.path, offset, size)
        if shard_index != self._current:
            self._close_stream()
            self._current, self._broken = shard_index, None
            self._stream = ForwardStream(shard.url)
        if self._broken:
            raise StreamBroken(self._broken)
        try:
            if offset < self._stream.tell():
                raise StreamBroken(f"{shard.name}: members asked out of order (offset {offset})")
            # the member's own header block ends where its data starts: a stream that changed since the
            # index pass (a command or server giving other bytes) is caught here, not silently mis-read
            self._stream.seek(offset - tarfile.BLOCKSIZE)
            header = self._stream.read(tarfile.BLOCKSIZE)
            try:
                same = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").size == size
            except tarfile.TarError:
                same = False
            if not same:
                raise StreamBroken(f"{shard.name}: no member of {size} bytes at offset {offset} this time "
                                   "(the stream differs from the index pass)")
            data = self._stream.read(size)
            if len(data) != size:
                raise StreamBroken(f"{shard.name}: the stream ended at offset {offset + len(data)}, "
                                   f"inside a member of {size} bytes")
        except OSError as e:
            self._broken = str(e)
            self._close_stream()
            raise StreamBroken(self._broken) from None
        self._pending[(shard_index, offset)] = data
        return data

    def keep(self, members: Iterable[tuple[int, int]]) -> None:
        """Spool these fetched members (shard index, offset) of streamed shards; forget the other fetched ones."""
        for shard_index, offset in members:
            if (shard_index, offset) in self._pending:
                self.spool.put(shard_index, offset, self._pending[(shard_index, offset)])
        self._pending.clear()

    def close(self) -> None:
        self._close_stream()
        self._pending.clear()
        self.spool.close()

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class MemberSpool:
    """Streamed members' bytes on local disk: one file per (rank, shard) and its index (offset, position,
    size), written when the scoring pass moves on to the next shard (members come shard by shard), so one
    file is open at a time however many shards there are; every rank can read them afterwards."""

    def __init__(self, folder: Path, rank: int = 0):
        self.dir, self.rank = folder, rank
        self._shard: int | None = None
        self._file = None
        self._index: list[tuple[int, int, int]] = []
        self._done: set[int] = set()

    def _path(self, shard_index: int, suffix: str) -> Path:
        return self.dir / f"r{self.rank}-s{shard_index}.{suffix}"

    def put(self, shard_index: int, offset: int, data: bytes) -> None:
        if shard_index != self._shard:
            self._finish_shard()
            if shard_index in self._done:
                raise RuntimeError(f"spool: shard {shard_index} was already finished")
            self.dir.mkdir(parents=True, exist_ok=True)
            self._shard, self._file, self._index = shard_index, open(self._path(shard_index, "bin"), "wb"), []
        self._index.append((offset, self._file.tell(), len(data)))
        self._file.write(data)

    def _finish_shard(self) -> None:
        if self._shard is None:
            return
        self._file.close()
        np.save(self._path(self._shard, "npy"), np.asarray(self._index, np.int64).reshape(-1, 3))
        self._done.add(self._shard)
        self._shard, self._file, self._index = None, None, []

    def close(self) -> None:
        self._finish_shard()


class SpooledMembers:
    """The writer's and refiner's reads of winners: `(shard index, offset, size) -> bytes` from the local
    file, or for a streamed shard from the spool the scoring pass (of any rank) filled."""

    def __init__(self, shards: Sequence[Shard], spool_dir: Path):
        self.shards, self.dir = shards, spool_dir
        self._index: dict[int, dict[int, tuple[Path, int, int]]] = {}

    def __call__(self, shard_index: int, offset: int, size: int) -> bytes:
        shard = self.shards[shard_index]
        if shard.url is None:
            return read_member(shard.path, offset, size)
        if shard_index not in self._index:
            found: dict[int, tuple[Path, int, int]] = {}
            for npy in sorted(self.dir.glob(f"r*-s{shard_index}.npy")):
                for off, pos, n in np.load(npy).tolist():
                    found[off] = (npy.with_suffix(".bin"), pos, n)
            self._index[shard_index] = found
        where = self._index[shard_index].get(offset)
        if where is None or where[2] != size:
            raise OSError(f"{shard.name}: member at offset {offset} is not in the spool")
        return read_member(where[0], where[1], size)
