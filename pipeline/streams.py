"""Shards that are not local files: `http(s)://` URLs and `pipe:` commands, read as forward-only streams.

A stream cannot seek, so a streamed shard is read at most twice: the index pass (a header walk over the
whole stream) and one forward pass that fetches just the drawn samples' image bytes, in offset order.
The bytes of the samples that may still become winners are copied to a spool on local disk (under the
run's staging folder), so the writer and the refiner re-read winners from there, not from the source.
Local files keep the plain seek-by-offset path (`read_member`).

A stream survives transient faults (`RetryPolicy`, from the job's runtime.retries, retry_backoff,
connect_timeout, read_timeout and stream_deadline): an HTTP 5xx, 408 or 429 (its Retry-After honoured), a
refused or reset connection, a timeout, a body shorter than its Content-Length, a `pipe:` command that
exits non-zero. The read goes on where it stopped: with a `Range` request (and `If-Range`, so a resource
that changed is sent whole, not spliced) when the server allows it, else by reading the source again from
the start and skipping the bytes already taken, which must be the same bytes (a CRC-32 of them is kept).
Every retry is one line on stderr and is counted (`StreamStats`).
"""

from __future__ import annotations

import email.utils
import http.client
import io
import os
import re
import select
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .keyed import keyed_u64
from .records import Shard
from .tario import read_member, write_bytes_atomic

LOOKBACK = 1 << 16  # bytes a stream can seek back (tarfile re-reads the header block it stopped at)
CHUNK = 1 << 20
MAX_WAIT = 60.0  # seconds: the longest wait between two tries, before its jitter


class StreamBroken(OSError):
    """Reading a streamed shard failed for good (after its retries, or at once for a permanent fault such as
    an HTTP 404): no connection, an HTTP error, a connection closed before Content-Length bytes, a `pipe:`
    command that exited non-zero, or data ending early."""


# -- the retry policy and its counts

@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # tries after the first, per stream
    backoff: float = 1.0  # seconds before the first retry; doubled for each next one, at most MAX_WAIT
    connect_timeout: float = 30.0
    read_timeout: float = 60.0  # a stall longer than this is a fault (and retried)
    deadline: float = 3600.0  # seconds one stream may spend reading and waiting, retries included

    @classmethod
    def of(cls, runtime: Any) -> RetryPolicy:
        """From a job's `runtime` section (rded.config.RuntimeConfig)."""
        return cls(runtime.retries, runtime.retry_backoff, runtime.connect_timeout, runtime.read_timeout,
                   runtime.stream_deadline)

    def wait(self, url: str, attempt: int) -> float:
        """Seconds before retry `attempt` (1-based): exponential, capped, plus a jitter of up to 50 % that is a
        pure function of (url, attempt), so ranks and shards spread out yet every run waits alike."""
        base = min(self.backoff * 2.0 ** (attempt - 1), MAX_WAIT)
        return base * (1.0 + 0.5 * keyed_u64(0, "retry-jitter", url, attempt) / 2.0 ** 64)


@dataclass
class StreamStats:
    """What the retries cost: retries by cause, the shards that needed one, the shards given up."""

    retries: Counter = field(default_factory=Counter)
    retried: set[str] = field(default_factory=set)
    given_up: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {"retries": sum(self.retries.values()), "retries_by_cause": dict(sorted(self.retries.items())),
                "retried_shards": len(self.retried), "shards_given_up": len(self.given_up),
                "given_up": sorted(self.given_up)}

    @staticmethod
    def merge(parts: Iterable[StreamStats]) -> StreamStats:
        """Every rank's counts as one (a shard read by several ranks counts once)."""
        out = StreamStats()
        for p in parts:
            out.retries.update(p.retries)
            out.retried |= p.retried
            out.given_up |= p.given_up
        return out


PASSES = ("index", "fetch")  # where a shard can break off: the index pass, the second (fetch) pass


@dataclass
class Streams:
    """One run's (one rank's) input reads: the retry policy, its counts, and the shards that broke off
    and were counted as skipped (`data.broken_shards = "skip"`; see rded.source.broken_shards)."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    stats: StreamStats = field(default_factory=StreamStats)
    broken: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (shard, pass) -> record
    _opener: urllib.request.OpenerDirector | None = field(default=None, repr=False)

    def open(self, source: Shard | Path | str):
        """A shard's bytes as a binary file: a local file (seekable) or a retrying ForwardStream."""
        if isinstance(source, Shard) and source.url is not None:
            return ForwardStream(source.url, self)
        return open(source.path if isinstance(source, Shard) else source, "rb")

    def note_broken(self, shard: str, where: str, at: str, cause: str, samples: int) -> None:
        """A shard that broke off in pass `where` (PASSES) at `at`, costing `samples` rows of corrupt_shard."""
        self.broken[(shard, where)] = {"shard": shard, "pass": where, "at": at, "cause": cause, "samples": samples}

    def as_dict(self) -> dict[str, Any]:
        return self.stats.as_dict()

    @property
    def opener(self) -> urllib.request.OpenerDirector:
        if self._opener is None:  # redirects followed (presigned URLs redirect); proxies from the environment
            t = self.policy.read_timeout
            self._opener = urllib.request.build_opener(_HTTPHandler(t), _HTTPSHandler(t))
        return self._opener


def log(msg: str) -> None:
    print(f"rded: {msg}", file=sys.stderr, flush=True)


# -- HTTP with separate connect and read timeouts

class _HTTPConnection(http.client.HTTPConnection):
    """Connects within `timeout` (the connect timeout), then reads with `read_timeout` per socket operation."""

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self._read_timeout)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()  # TCP and the TLS handshake, within the connect timeout
        self.sock.settimeout(self._read_timeout)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self._read_timeout = read_timeout

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(partial(_HTTPConnection, read_timeout=self._read_timeout), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self._read_timeout = read_timeout

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(partial(_HTTPSConnection, read_timeout=self._read_timeout), req,
                            context=self._context)


# -- one try at reading a stream

class _Fault(Exception):
    """One failed try: `cause` is its kind (counted), `detail` what happened; a permanent one is not retried."""

    def __init__(self, cause: str, detail: str, *, permanent: bool = False, retry_after: float | None = None):
        super().__init__(detail)
        self.cause, self.detail, self.permanent, self.retry_after = cause, detail, permanent, retry_after


class _Body(Protocol):
    def read(self, n: int) -> bytes: ...

    def finish(self, pos: int) -> None:
        """At the end of the data (`pos` bytes in all): the source's verdict, a _Fault when it is bad."""

    def close(self) -> None: ...


class _PipeBody:
    """A `pipe:` command's stdout; a stall longer than the read timeout is a fault like an HTTP one."""

    def __init__(self, command: str, read_timeout: float):
        # the shell runs the command, as webdataset does; stderr goes to ours
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        self._timeout = read_timeout

    def read(self, n: int) -> bytes:
        fd = self._proc.stdout.fileno()
        if not select.select([fd], [], [], self._timeout)[0]:
            raise TimeoutError(f"the command gave no data for {self._timeout:g} s")
        return os.read(fd, n)

    def finish(self, pos: int) -> None:
        status = self._proc.wait()
        if status != 0:
            raise _Fault("exit_status", f"the command exited with status {status} after {pos} bytes")

    def close(self) -> None:
        if self._proc.poll() is None:  # stopped early on purpose (or stalled): its verdict no longer matters
            self._proc.kill()
        self._proc.stdout.close()
        self._proc.wait()


class _HttpBody:
    def __init__(self, response: http.client.HTTPResponse, total: int | None):
        self._response, self._total = response, total

    def read(self, n: int) -> bytes:
        return self._response.read1(n)  # what has arrived: a timeout loses nothing already taken

    def finish(self, pos: int) -> None:
        if self._total is not None and pos != self._total:
            raise _Fault("short_read", f"the connection closed after {pos} of {self._total} bytes")

    def close(self) -> None:
        self._response.close()


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), or None."""
    value = (headers.get("Retry-After") or "").strip() if headers is not None else ""
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _fault(e: BaseException, where: str, policy: RetryPolicy) -> _Fault:
    """What an exception from one try means: its cause, and whether another try can help."""
    if isinstance(e, _Fault):
        return e
    if isinstance(e, urllib.error.HTTPError):
        retry = e.code in (408, 429) or e.code >= 500
        return _Fault(f"http_{e.code}", f"HTTP {e.code} {e.reason}", permanent=not retry,
                      retry_after=_retry_after(e.headers) if e.code in (429, 503) else None)
    if isinstance(e, urllib.error.URLError):
        if not isinstance(e.reason, BaseException):  # e.g. no host given
            return _Fault("other", f"{e.reason}", permanent=True)
        if isinstance(e.reason, TimeoutError):
            return _Fault("timeout", f"timeout after {policy.connect_timeout:g} s connecting")
        e = e.reason
    if isinstance(e, ssl.SSLCertVerificationError):
        return _Fault("tls", f"TLS: {e}", permanent=True)
    if isinstance(e, TimeoutError):
        return _Fault("timeout", f"timeout after {policy.read_timeout:g} s {where}")
    if isinstance(e, ConnectionRefusedError):
        return _Fault("connection_refused", "connection refused")
    if isinstance(e, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return _Fault("connection_reset", f"the connection was reset {where}")
    if isinstance(e, http.client.IncompleteRead):
        return _Fault("short_read", f"the body ended early {where}")
    if isinstance(e, (OSError, http.client.HTTPException)):
        return _Fault("other", f"{type(e).__name__}: {e} {where}")
    return _Fault("other", f"{type(e).__name__}: {e}", permanent=True)


class ForwardStream:
    """A binary file-like object over a URL or `pipe:` command that reads forward only (seeking forward
    skips bytes; seeking back works within the last LOOKBACK bytes). Opened on the first read, so a
    failure to connect surfaces where the shard is read. A failed try is retried as the policy allows,
    going on at the byte where it stopped; at the end of the data the source's own verdict is checked
    (the HTTP Content-Length, the command's exit status). What cannot be read raises StreamBroken."""

    def __init__(self, url: str, streams: Streams | None = None):
        self.name = url
        self._streams = streams if streams is not None else Streams()
        self._body: _Body | None = None
        self._raw_pos = 0  # bytes taken from the source
        self._crc = 0  # CRC-32 of those bytes: a source read again from the start must give them again
        self._hist = bytearray()  # the last bytes taken (for short seeks back)
        self._pos = 0  # the reader's position
        self._end: int | None = None  # the length, once the end was reached cleanly
        self._failed: str | None = None
        self._attempt = 0  # retries so far
        self._spent = 0.0  # seconds spent reading and waiting (the deadline's measure)
        # HTTP: what the first response said, for going on where a try stopped
        self._total: int | None = None  # Content-Length of the whole resource
        self._validator: str | None = None  # a strong ETag, or Last-Modified (for If-Range)
        self._ranges = False  # whether the server said it serves byte ranges (Accept-Ranges: bytes)

    @property
    def _policy(self) -> RetryPolicy:
        return self._streams.policy

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
        self._close_body()

    def __enter__(self) -> ForwardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the source
    def _take(self, n: int) -> bytes:
        """Up to n bytes from the source (fewer only at its end, or as they arrive); retries failed tries and
        checks the source's verdict at the end."""
        if self._failed:
            raise StreamBroken(self._failed)
        while True:
            started = time.monotonic()
            where = f"reading at byte {self._raw_pos}" if self._body is not None else "waiting for the response"
            try:
                if self._body is None:
                    self._connect()
                    where = f"reading at byte {self._raw_pos}"
                block = self._body.read(n)
                if not block:
                    self._body.finish(self._raw_pos)
            except (_Fault, OSError, ValueError, http.client.HTTPException) as e:
                self._spent += time.monotonic() - started
                self._close_body()
                if isinstance(e, urllib.error.HTTPError):
                    e.close()
                self._retry_or_give_up(_fault(e, where, self._policy))
                continue
            self._spent += time.monotonic() - started
            if self._spent > self._policy.deadline:
                self._close_body()
                self._give_up(_Fault("deadline", f"the stream took more than runtime.stream_deadline "
                                                 f"({self._policy.deadline:g} s)", permanent=True))
            break
        if not block:
            self._end = self._raw_pos
            self._close_body()
        self._raw_pos += len(block)
        self._crc = zlib.crc32(block, self._crc)
        self._hist += block
        del self._hist[:-LOOKBACK]
        return block

    def _retry_or_give_up(self, fault: _Fault) -> None:
        """Wait for the next try, or raise StreamBroken when the fault is permanent or the retries or the
        deadline are spent."""
        policy, stats = self._policy, self._streams.stats
        if fault.permanent or self._attempt >= policy.retries:
            self._give_up(fault)
        self._attempt += 1
        wait = policy.wait(self.name, self._attempt)
        if fault.retry_after is not None:
            wait = max(wait, fault.retry_after)
        if self._spent + wait > policy.deadline:
            self._give_up(_Fault(fault.cause, f"{fault.detail}; the next try would pass runtime.stream_deadline "
                                              f"({policy.deadline:g} s)", permanent=True))
        stats.retries[fault.cause] += 1
        stats.retried.add(self.name)
        log(f"retry {self._attempt} of {policy.retries}: {self.name}: {fault.detail}; {self._how()} in {wait:.1f} s")
        time.sleep(wait)
        self._spent += wait

    def _give_up(self, fault: _Fault) -> None:
        self._streams.stats.given_up.add(self.name)
        tries = f" (after {self._attempt} retries)" if self._attempt else (" (not retried)" if fault.permanent else "")
        self._failed = f"{self.name}: {fault.detail}{tries}"
        raise StreamBroken(self._failed)

    def _how(self) -> str:
        """How the next try goes on from where this one stopped (for the log)."""
        at = self._raw_pos
        if self.name.startswith("pipe:"):
            return "rerunning the command" + (f" and skipping the {at} bytes already read" if at else "")
        if not at:
            return "requesting it again"
        if self._validator and self._ranges:
            return "resuming with a Range request"
        return f"requesting it again and skipping the {at} bytes already read"

    def _close_body(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            body.close()

    def _connect(self) -> None:
        """A new try, giving the source's bytes from self._raw_pos on."""
        at = self._raw_pos
        if self.name.startswith("pipe:"):
            self._body, start = _PipeBody(self.name[5:], self._policy.read_timeout), 0
        else:
            self._body, start = self._open_http(at)
        if start < at:
            self._skip(at)

    def _skip(self, at: int) -> None:
        """Read the first `at` bytes again (a source without Range support): they must be the ones taken."""
        crc, pos = 0, 0
        while pos < at:
            block = self._body.read(min(CHUNK, at - pos))
            if not block:
                self._body.finish(pos)
                raise _Fault("changed", f"the source gave {pos} bytes this time, fewer than the {at} already read "
                                        "(it changed while being read)", permanent=True)
            crc = zlib.crc32(block, crc)
            pos += len(block)
        if crc != self._crc:
            raise _Fault("changed", f"the source gave other bytes than the first time before byte {at} "
                                    "(it changed while being read)", permanent=True)

    def _open_http(self, at: int) -> tuple[_HttpBody, int]:
        """A GET from byte `at` (a Range request when the first response allows it); returns the body and the
        byte its data starts at (0 when the server sent the whole resource)."""
        ranged = at > 0 and self._ranges and self._validator is not None
        headers = {"Range": f"bytes={at}-", "If-Range": self._validator} if ranged else {}
        request = urllib.request.Request(self.name, headers=headers)
        try:
            response = self._streams.opener.open(request, timeout=self._policy.connect_timeout)
        except urllib.error.HTTPError as e:
            if ranged and e.code == 416:  # the server will not serve the range: read it whole
                e.close()
                self._ranges = False
                return self._open_http(at)
            raise
        if response.status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
            same = _validator(response.headers) in (None, self._validator)
            if ranged and same and m and int(m[1]) == at and (m[3] == "*" or self._total is None
                                                              or int(m[3]) == self._total):
                return _HttpBody(response, self._total), at
            response.close()
            if not ranged:
                raise _Fault("other", "HTTP 206 (a part) for a request of the whole resource", permanent=True)
            self._ranges = False  # a range other than asked: read it whole
            return self._open_http(at)
        # 200: the whole resource (the first try, a server without ranges, or one whose resource changed)
        self._total = response.length
        self._validator = _validator(response.headers)
        self._ranges = response.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
        return _HttpBody(response, self._total), 0


def _validator(headers: Any) -> str | None:
    """A strong ETag, else Last-Modified: what If-Range may name."""
    etag = (headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return (headers.get("Last-Modified") or "").strip() or None


def open_shard(source: Shard | Path | str, streams: Streams | None = None):
    """A shard's bytes as a binary file: a local file (seekable) or a ForwardStream (retrying as `streams`'
    policy says; the default policy without one)."""
    return (streams if streams is not None else Streams()).open(source)


class MemberFetcher:
    """The scoring pass's reads: `(shard index, offset, size) -> bytes`, asked in (shard, offset) order.

    Local shards: a seek per member. Streamed shards: one forward pass each (retrying as `streams` says),
    opened at the shard's first member and closed when the next shard starts (so a shard is never opened
    twice here); once broken, the shard's remaining members raise StreamBroken without another attempt, and
    `breaks` names where and why. Fetched bytes wait in memory only until the caller says which to `keep`
    (spooled to disk for the writer) — one batch at a time.
    """

    def __init__(self, shards: Sequence[Shard], spool_dir: Path, rank: int = 0, streams: Streams | None = None):
        self.shards = shards
        self.spool = MemberSpool(spool_dir, rank)
        self.streams = streams if streams is not None else Streams()
        self.breaks: dict[int, tuple[int, str]] = {}  # shard index -> (offset of the first member lost, cause)
        self._current: int | None = None
        self._stream: ForwardStream | None = None
        self._pending: dict[tuple[int, int], bytes] = {}

    def __call__(self, shard_index: int, offset: int, size: int) -> bytes:
        shard = self.shards[shard_index]
        if shard.url is None:
            return read_member(shard.path, offset, size)
        if shard_index != self._current:
            self._close_stream()
            self._current = shard_index
            self._stream = ForwardStream(shard.url, self.streams)
        if shard_index in self.breaks:
            raise StreamBroken(self.breaks[shard_index][1])
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
            self.breaks[shard_index] = (offset, str(e))
            self._close_stream()
            raise StreamBroken(str(e)) from None
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
    size, CRC-32), written when the scoring pass moves on to the next shard (members come shard by shard), so
    one file is open at a time however many shards there are; every rank can read them afterwards. A shard's
    files are synced before its score unit is committed (`seal`), since the unit is only usable with them."""

    def __init__(self, folder: Path, rank: int = 0):
        self.dir, self.rank = folder, rank
        self._shard: int | None = None
        self._file = None
        self._index: list[tuple[int, int, int, int]] = []
        self._done: set[int] = set()

    def put(self, shard_index: int, offset: int, data: bytes) -> None:
        if shard_index != self._shard:
            self._finish_shard()
            if shard_index in self._done:
                raise RuntimeError(f"spool: shard {shard_index} was already finished")
            self.dir.mkdir(parents=True, exist_ok=True)
            self._shard, self._file, self._index = shard_index, open(spool_path(self.dir, self.rank, shard_index, "bin"), "wb"), []
        self._index.append((offset, self._file.tell(), len(data), zlib.crc32(data)))
        self._file.write(data)

    def seal(self, shard_index: int) -> None:
        """The shard's spool is complete and durable (an empty one when none of its members was kept)."""
        if self._shard == shard_index:
            self._finish_shard()
        elif shard_index not in self._done:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._shard, self._index = shard_index, []
            self._file = open(spool_path(self.dir, self.rank, shard_index, "bin"), "wb")
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._shard is None:
            return
        shard, file, index = self._shard, self._file, self._index
        self._shard, self._file, self._index = None, None, []  # once, even when a write below fails
        with file:
            file.flush()
            os.fsync(file.fileno())
        buf = io.BytesIO()
        np.save(buf, np.asarray(index, np.int64).reshape(-1, 4))
        write_bytes_atomic(spool_path(self.dir, self.rank, shard, "npy"), buf.getvalue())
        self._done.add(shard)

    def close(self) -> None:
        self._finish_shard()


def spool_path(folder: Path, rank: int, shard_index: int, suffix: str) -> Path:
    return folder / f"r{rank}-s{shard_index}.{suffix}"


def spool_is_whole(folder: Path, rank: int, shard_index: int) -> bool:
    """Whether a rank's spool of a shard is there and reads back whole (every member's CRC): a committed
    score unit of a streamed shard is only reused with it."""
    try:
        index = np.load(spool_path(folder, rank, shard_index, "npy"))
        with open(spool_path(folder, rank, shard_index, "bin"), "rb") as f:
            for _, pos, size, crc in index.tolist():
                f.seek(pos)
                if zlib.crc32(f.read(size)) != crc:
                    return False
    except (OSError, ValueError):
        return False
    return True


class SpooledMembers:
    """The writer's and refiner's reads of winners: `(shard index, offset, size) -> bytes` from the local
    file, or for a streamed shard from the spool the scoring pass (of any rank) filled, checked by CRC."""

    def __init__(self, shards: Sequence[Shard], spool_dir: Path):
        self.shards, self.dir = shards, spool_dir
        self._index: dict[int, dict[int, tuple[Path, int, int, int]]] = {}

    def __call__(self, shard_index: int, offset: int, size: int) -> bytes:
        shard = self.shards[shard_index]
        if shard.url is None:
            return read_member(shard.path, offset, size)
        if shard_index not in self._index:
            found: dict[int, tuple[Path, int, int, int]] = {}
            for npy in sorted(self.dir.glob(f"r*-s{shard_index}.npy")):
                for off, pos, n, crc in np.load(npy).tolist():
                    found[off] = (npy.with_suffix(".bin"), pos, n, crc)
            self._index[shard_index] = found
        where = self._index[shard_index].get(offset)
        if where is None or where[2] != size:
            raise OSError(f"{shard.name}: member at offset {offset} is not in the spool")
        data = read_member(where[0], where[1], size)
        if zlib.crc32(data) != where[3]:
            raise OSError(f"{where[0]}: the spooled member at offset {offset} of {shard.name} is damaged (CRC); "
                          "rerun with --overwrite")
        return data
