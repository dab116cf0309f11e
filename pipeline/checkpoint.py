"""Resumable runs: the work a run has committed in its staging folder, and the checks that decide whether a
later `--resume` may use it.

A run commits its work in small units, each one file written whole and renamed into place (so a unit is
there complete or not at all; a leftover temporary file is ignored and its unit redone):
- `score/p<position>.r<rank>.npz`: one input shard's scoring (its key patches and the samples it could not
  use), committed after the shard's last drawn sample;
- the refine spool's `batch-<j>.json` (rded.refine.Spool): one refine batch, after its images;
- `out/<shard>.json` (+ `.npz`): one output shard, after its image and label shards were written.
The index pass (a header walk, a few percent of the job) is not a unit: every attempt walks again, and the
walk's digest must equal the first attempt's, which is how a changed input shard is caught.

`run.json` names what the work belongs to: the job (a digest of its validated settings, overrides
included), the rded version and a digest of its code, and the number of ranks. A resume with any of them
different is refused (JobError: exit 2), and the committed work is left as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import JobError
from .tario import write_bytes_atomic

CHECKPOINT = ".checkpoint"
RUN_FILE = "run.json"
FORMAT = "rded-checkpoint/1"


def job_digest(job: dict[str, Any]) -> str:
    """The job's validated settings (as the manifest records them), less the progress bar."""
    settings = json.loads(json.dumps(job))
    settings.get("runtime", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def code_digest() -> str:
    """The package's source: a resumed run must run the code that started it, version bump or not."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class IndexDigest:
    """sha256 over what the index pass read: every record's shard, key, offset and size or reason."""

    def __init__(self):
        self._h = hashlib.sha256()

    def add(self, *fields: Any) -> None:
        self._h.update(("\t".join(map(str, fields)) + "\n").encode("utf-8", "surrogatepass"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _kill_switch(point: str) -> None:
    """A test hook: RDED_TEST_KILL=<point>:<n> SIGKILLs this process at the n-th time it reaches `point`
    ('event': after a unit is committed or a shard indexed; 'rename': inside a commit, after the temporary
    file is written and before it is renamed). RDED_TEST_KILL_RANK limits it to one rank, and
    RDED_TEST_KILL_ONCE names a file that makes it fire once per launch (a restarted worker survives)."""
    spec = os.environ.get("RDED_TEST_KILL")
    if not spec:
        return
    where, _, count = spec.partition(":")
    if where != point or os.environ.get("RDED_TEST_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _kill_switch.seen[point] = _kill_switch.seen.get(point, 0) + 1  # type: ignore[attr-defined]
    once = os.environ.get("RDED_TEST_KILL_ONCE")
    if _kill_switch.seen[point] == int(count) and not (once and Path(once).exists()):  # type: ignore[attr-defined]
        if once:
            Path(once).touch()
        os.kill(os.getpid(), signal.SIGKILL)


_kill_switch.seen = {}  # type: ignore[attr-defined]


@dataclass
class Checkpoint:
    """One rank's view of the run's committed units, and what this attempt reused and computed."""

    dir: Path
    rank: int = 0
    resumed: bool = False
    commit_seconds: float = 0.0
    reused: Counter = field(default_factory=Counter)
    computed: Counter = field(default_factory=Counter)

    # -- the run's identity

    @staticmethod
    def identity(job: dict[str, Any], version: str, world: int) -> dict[str, Any]:
        return {"format": FORMAT, "job_sha256": job_digest(job), "rded": version, "code_sha256": code_digest(),
                "ranks": world}

    def read_identity(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None

    def check_identity(self, expected: dict[str, Any], where: Path) -> None:
        """Refuse (JobError) to resume work that belongs to another job, code or rank count."""
        found = self.read_identity() or {}
        reasons = []
        if found.get("job_sha256") != expected["job_sha256"]:
            reasons.append("the job file or the --set overrides differ from the ones it started with")
        if found.get("rded") != expected["rded"] or found.get("code_sha256") != expected["code_sha256"]:
            reasons.append(f"rded changed since it started (then {found.get('rded')}, now {expected['rded']}"
                           + (", same version but other code" if found.get("rded") == expected["rded"] else "") + ")")
        if found.get("ranks") != expected["ranks"]:
            reasons.append(f"it ran on {found.get('ranks')} ranks, this launch has {expected['ranks']}")
        if reasons:
            raise JobError(f"--resume: the unfinished run in {where} cannot be continued: {'; '.join(reasons)}. "
                           "Its work is kept; run with the job it started with, or pass --overwrite to start afresh")

    def write_identity(self, identity: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write(self.dir / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True).encode())

    def check_inputs(self, digest: str, where: Path) -> None:
        """The first attempt's index digest is kept; a later attempt must have read the same inputs."""
        path = self.dir / f"index.r{self.rank}.json"
        if not path.exists():
            self._write(path, json.dumps({"sha256": digest}).encode())
            return
        if json.loads(path.read_text())["sha256"] != digest:
            raise JobError(f"--resume: the input shards changed since the unfinished run in {where} started (the "
                           "index pass read other samples); its work is kept. Restore the shards, or pass "
                           "--overwrite to start afresh")

    # -- units

    def path(self, name: str) -> Path:
        return self.dir / name

    def commit(self, name: str, data: bytes, kind: str) -> None:
        """A unit, written whole under a temporary name, then renamed into place."""
        started = time.perf_counter()
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write(path, data)
        self.computed[kind] += 1
        self.commit_seconds += time.perf_counter() - started
        event()

    def load(self, name: str, kind: str) -> bytes | None:
        """A committed unit's bytes, or None when it was never committed."""
        try:
            data = (self.dir / name).read_bytes()
        except FileNotFoundError:
            return None
        self.reused[kind] += 1
        return data

    def discard(self, name: str, kind: str) -> None:
        """A unit found unusable (damaged, or what it points to is missing): it will be redone."""
        (self.dir / name).unlink(missing_ok=True)
        self.reused[kind] -= 1

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        write_bytes_atomic(path, data, before_rename=lambda: _kill_switch("rename"))

    @staticmethod
    def report(parts: list[Checkpoint]) -> dict[str, Any]:
        """What this attempt took from committed work and what it computed (every rank's parts), and the
        time it spent committing."""
        reused, computed = Counter(), Counter()
        for c in parts:
            reused.update(c.reused)
            computed.update(c.computed)
        return {"resumed": parts[0].resumed, "units_reused": dict(sorted((+reused).items())),
                "units_computed": dict(sorted((+computed).items())),
                "commit_seconds": round(sum(c.commit_seconds for c in parts), 3)}


def event() -> None:
    """A point where a test may kill the run (after a commit, after a shard is indexed)."""
    _kill_switch("event")


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npz_arrays(data: bytes) -> dict[str, np.ndarray] | None:
    """The arrays of a unit, or None when it does not read back whole (it is then redone)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile):
        return None
