"""The staging folder of a run directory, in one place: its layout, the lock that makes one process its
owner, and the order of publishing and cleaning up.

    DIR/.rded.lock          the owner's advisory lock (flock), held for the whole run; names the holder
    DIR/.rded-staging/      everything the run makes, until it is published:
        .checkpoint/        committed units and the run's identity (rded.checkpoint)
        .streamed/          streamed shards' spooled winners (rded.streams)
        .refined/           refined images (rded.refine.Spool)
        .ledger/            ledger parts (rded.report), assembled into samples.tsv
        distilled-*.tar, labels-*.tar, samples.tsv, report.json, contact-sheet.png
        manifest.json       written once the previous run is removed: the staged run is complete and
                            being published

`Staging.publish` is the one call that publishes: it removes the previous run (its manifest first), stages
the manifest, moves the listed files into DIR, writes DIR/manifest.json (the commit point) and only then
deletes the units. A failure or kill anywhere leaves either the complete staged run (a later start finishes
the publish, `recover`) or the complete published run. Every rename is followed by a sync of its directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .cards import CARD_FILES
from .checkpoint import CHECKPOINT, publish_step
from .errors import RunError, RunLocked
from .rundir import MANIFEST, RECORDS, STAGING, Manifest, bn_stats_file, remove_previous_run, verify_run, write_json
from .tario import fsync_dir, write_bytes_atomic

LOCK = ".rded.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class RunLock:
    """An exclusive advisory lock (flock) on DIR/.rded.lock, held while a process owns the run directory. The
    kernel releases it when the process dies, however it dies, so a killed run never leaves a stale lock
    (only a file, which the next owner takes over). The owner removes the file when it ends; a process that
    locked a file removed meanwhile sees another inode under the name and tries again, so two processes never
    both hold it."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLocked(f"{self.path.parent}: in use by another rded process ({self.holder() or 'holder unknown'}); "
                                "one process (one torchrun launch) owns a run directory: wait for it to end or stop "
                                "it, or give this run another --out") from None
            except OSError as e:
                os.close(fd)
                if e.errno in _NO_LOCKS:
                    raise RunLocked(f"{self.path}: the file system does not support locks ({e.strerror}); on NFS "
                                    "mount with locking (not nolock or local_lock=all), or give each run its own "
                                    "--out") from None
                raise
            if self._same_file(fd):
                break
            os.close(fd)  # the previous owner removed the file after we opened it: lock the new one
        else:
            raise RunLocked(f"{self.path}: could not be locked (it keeps being replaced)")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        os.fsync(fd)
        self._fd = fd

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def holder(self) -> str | None:
        """Who holds the lock, as the holder wrote it."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def held_elsewhere(self) -> str | None:
        """Probe without keeping it: the holder's description when another process holds the lock, else None."""
        if not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if isinstance(e, BlockingIOError):
                return self.holder() or "holder unknown"
            return None
        finally:
            os.close(fd)  # closing drops the probe's lock
        return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the file (while still holding it), then unlock."""
        if self._fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only or full file system: the file stays, unlocked, for the next owner
            os.close(self._fd)
            self._fd = None


class Staging:
    """The staging folder of `out_dir` and everything placed in it."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / STAGING

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT

    @property
    def stream_spool(self) -> Path:
        return self.dir / ".streamed"

    @property
    def refined(self) -> Path:
        return self.dir / ".refined"

    @property
    def ledger(self) -> Path:
        return self.dir / ".ledger"

    @property
    def staged_manifest(self) -> Path:
        return self.dir / MANIFEST

    def committed_work(self) -> bool:
        """Whether the folder holds a committed unit (scoring, refinement or an output shard) or a staged run."""
        if self.staged_manifest.is_file():
            return True
        return any(any((self.dir / where).glob(pattern)) for where, pattern in
                   ((f"{CHECKPOINT}/score", "*.npz"), (f"{CHECKPOINT}/out", "*.json"), (".refined", "batch-*.json")))

    def fresh(self) -> None:
        """An empty staging folder (one left by an earlier run is cleared)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir()
        fsync_dir(self.out_dir)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- publishing

    def publish(self, manifest: Manifest) -> None:
        """Replace any previous run in the output directory with the staged one, then clean up."""
        files = published_files(manifest)
        missing = [name for name in files if not (self.dir / name).is_file()]
        if missing:
            raise RunError(f"{self.dir}: the staged run lacks {', '.join(missing[:5])}")
        publish_step()
        remove_previous_run(self.out_dir)
        fsync_dir(self.out_dir)
        publish_step()
        write_json(self.staged_manifest, manifest.to_json())  # from here on, `recover` completes the publish
        publish_step()
        self._move_and_commit(files)

    def recover(self) -> Manifest | None:
        """Finish a publish that a kill or failure interrupted (the staged manifest is there): the files it
        had not moved yet are moved, those it had are checked against the manifest, and it is committed.
        Returns the published manifest, or None when there was nothing to finish."""
        if not self.staged_manifest.is_file():
            return None
        try:
            manifest = Manifest.from_json(json.loads(self.staged_manifest.read_text()), self.staged_manifest)
        except ValueError as e:
            raise RunError(f"{self.staged_manifest}: a staged run whose manifest cannot be read ({e}); "
                           "pass --overwrite to start afresh") from None
        files = published_files(manifest)
        gone = [n for n in files if not (self.dir / n).is_file() and not (self.out_dir / n).is_file()]
        if gone:
            raise RunError(f"{self.dir}: the staged run is incomplete ({', '.join(gone[:5])} missing); "
                           "pass --overwrite to start afresh")
        self._move_and_commit(files, check=manifest)
        return manifest

    def _move_and_commit(self, files: list[str], check: Manifest | None = None) -> None:
        for name in files:
            if (self.dir / name).is_file():
                os.replace(self.dir / name, self.out_dir / name)
                publish_step()
        fsync_dir(self.out_dir)
        if check is not None:  # moved by an earlier attempt: trust nothing unchecked
            verify_run(self.out_dir, check)
        write_bytes_atomic(self.out_dir / MANIFEST, self.staged_manifest.read_bytes())  # the commit
        publish_step()
        self.clean()

    def clean(self) -> None:
        """After the commit: the units, spools and ledger parts first, the staged manifest last."""
        for item in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            if item.name == MANIFEST:
                continue
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
            publish_step()
        self.staged_manifest.unlink(missing_ok=True)
        self.dir.rmdir()
        fsync_dir(self.out_dir)


def published_files(manifest: Manifest) -> list[str]:
    """What a run publishes besides its manifest: the records (a contact sheet when there are images, the BN
    statistics refinement matched when they were the data's), then every image and label shard, then the cards
    that describe them (README.md, _info.json: rded.cards)."""
    records = [r for r in RECORDS if r != "contact-sheet.png" or manifest.images]
    records += [name for name, _ in bn_stats_file(manifest)]
    shards = [n for s in manifest.shards for n in [s.name] + ([s.labels["name"]] if s.labels else [])]
    return records + shards + list(CARD_FILES)

