"""Resumable runs: the work a run has committed in its staging folder, and the checks that decide whether a
later `--resume` may use it.

A run commits its work in small units, each one file written whole and renamed into place (so a unit is
there complete or not at all; a leftover temporary file is ignored and its unit redone):
- `score/p<position>.r<rank>.npz`: one input shard's scoring (its key patches and the samples it could not
  use), committed after the shard's last drawn sample;
- `bn_stats.json` (rded.bnstats, refine.bn_stats = "data"): the data's BN statistics, before any refine batch;
- the refine spool's `batch-<j>.json` (rded.refine.Spool): one refine batch, after its images;
- `out/<shard>.json` (+ `.npz`): one output shard, after its image and label shards were written.
The index pass (a header walk, a few percent of the job) is not a unit: every attempt walks again, and the
walk's digest must equal the first attempt's, which is how a changed input shard is caught.

`run.json` holds the run's identity (`run_identity`): the settings that decide the output (batch sizes,
threads, retries and the like may change between attempts), the input shards, what `auto` resolved to,
the library versions and a digest of rded's code, and the number of ranks. A resume whose identity differs
is refused (JobError: exit 2) naming each difference, and the committed work is left as it was.
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
FORMAT = "rded-checkpoint/2"


# Settings that may change between attempts of one run: none of them changes a byte of the output (batch
# sizes, threads, pixel budgets, progress, how streams are retried and how long ranks wait).
NOT_IN_IDENTITY = {"runtime": {"batch_size", "dali_threads", "max_batch_pixels", "progress", "retries",
                               "retry_backoff", "connect_timeout", "read_timeout", "stream_deadline",
                               "dist_timeout", "threads"}}


def without_attempt_settings(job: dict[str, Any]) -> dict[str, Any]:
    """The job as a manifest records it: less the settings that may change between attempts, so that a run
    resumed with a smaller batch size publishes the bytes of the run never interrupted (report.json records
    each attempt's own)."""
    return {section: ({k: v for k, v in values.items() if k not in NOT_IN_IDENTITY.get(section, ())}
                      if isinstance(values, dict) else values) for section, values in job.items()}


def result_settings(job: dict[str, Any]) -> dict[str, Any]:
    """The job's validated settings that decide the output, as dotted keys (`distill.seed`)."""
    flat: dict[str, Any] = {}
    for section, values in job.items():
        if not isinstance(values, dict):
            flat[section] = values
            continue
        for key, value in values.items():
            if key not in NOT_IN_IDENTITY.get(section, ()):
                flat[f"{section}.{key}"] = value
    return json.loads(json.dumps(flat, sort_keys=True))


def run_identity(job: dict[str, Any], shards: list[str], resolved: dict[str, str], versions: dict[str, str],
                 world: int) -> dict[str, Any]:
    """What a run's output is a function of: the result-affecting settings, the input shards (as listed),
    what `auto` resolved to on this node (device, decoder, precision), the libraries and code that compute
    it, and (for unfinished work, which is committed per rank) the rank count."""
    return {"format": FORMAT, "settings": result_settings(job), "shards": shards, "resolved": resolved,
            "versions": versions, "code_sha256": code_digest(), "ranks": world}


def identity_differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Each difference named: `distill.seed (0, now 7)`; keys absent from `found` (older records) are not
    compared, but for the format."""
    if found.get("format") != expected.get("format"):
        return [f"the record's format ({found.get('format')}, now {expected.get('format')}: written by another rded)"]
    out = []
    for group in ("settings", "resolved", "versions"):
        old, new = found.get(group), expected.get(group, {})
        if old is None:
            continue
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                name = key if group == "settings" else f"{group}.{key}"
                out.append(f"{name} ({json.dumps(old.get(key))}, now {json.dumps(new.get(key))})")
    if "shards" in found and found["shards"] != expected.get("shards"):
        old, new = found["shards"], expected["shards"]
        changed = sorted(set(old) ^ set(new))
        out.append(f"data.train's shards ({len(old)}, now {len(new)}"
                   + (f"; not in both: {', '.join(changed[:3])}" if changed else "; in another order") + ")")
    if "code_sha256" in found and found["code_sha256"] != expected.get("code_sha256"):
        out.append("rded's code (same version, other code)" if not out else "rded's code")
    if "ranks" in found and "ranks" in expected and found["ranks"] != expected["ranks"]:
        out.append(f"ranks ({found['ranks']}, now {expected['ranks']})")
    return out


def code_digest() -> str:
    """The package's source: a resumed run must run the code that started it, version bump or not."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class IndexDigest:
    """What the index pass read, per input shard (by its canonical position): a sha256 over its records
    (shard, key, offset, and size or reason), how many records it gave, and where it broke off, if it did
    (data.broken_shards = "skip"). A resumed run compares shard by shard, so a refusal names the shard that
    changed, and replays a recorded break at the same place (rded.source.Replay)."""

    def __init__(self) -> None:
        self.shards: dict[int, dict[str, Any]] = {}
        self._hashes: dict[int, Any] = {}

    def add(self, position: int, *fields: Any) -> None:
        h = self._hashes.setdefault(position, hashlib.sha256())
        h.update(("\t".join(map(str, fields)) + "\n").encode("utf-8", "surrogatepass"))

    def finish_shard(self, position: int, name: str, records: int, broken: dict[str, Any] | None = None) -> None:
        """The shard's entry once it is read: `records` it gave in all; `broken`: {at, cause, records (before
        the break)} when it broke off."""
        h = self._hashes.pop(position, None) or hashlib.sha256()
        self.shards[position] = {"name": name, "sha256": h.hexdigest(), "records": records, "broken": broken}

    @staticmethod
    def same(entry: dict[str, Any] | None) -> tuple | None:
        """What must be equal between attempts (a break's cause may be told in other words)."""
        if entry is None:
            return None
        return entry["name"], entry["sha256"], entry["records"], (entry.get("broken") or {}).get("at")

    def hexdigest(self) -> str:
        return hashlib.sha256(json.dumps([[p, *self.same(self.shards[p])] for p in sorted(self.shards)]).encode()
                              ).hexdigest()

    def to_bytes(self) -> bytes:
        return json.dumps({"sha256": self.hexdigest(), "shards": {str(p): e for p, e in sorted(self.shards.items())}},
                          indent=1).encode()

    @staticmethod
    def path(checkpoint: Checkpoint) -> Path:
        return checkpoint.dir / f"index.r{checkpoint.rank}.json"

    @staticmethod
    def recorded(checkpoint: Checkpoint) -> dict[int, dict[str, Any]]:
        """The first attempt's entries by shard position (none when it recorded none)."""
        try:
            found = json.loads(IndexDigest.path(checkpoint).read_text())
        except (OSError, ValueError):
            return {}
        return {int(p): e for p, e in found.get("shards", {}).items()}


def _kill_switch(point: str) -> None:
    """A test hook: RDED_TEST_KILL=<point>:<n> SIGKILLs this process at the n-th time it reaches `point`
    ('event': after a unit is committed or a shard indexed; 'rename': inside a commit, after the temporary
    file is written and before it is renamed; 'publish': each step of finishing and publishing).
    RDED_TEST_KILL_SIGNAL=TERM (or STOP, to pause it there) sends that signal instead of SIGKILL. RDED_TEST_KILL_RANK limits it to one rank, and
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
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("RDED_TEST_KILL_SIGNAL", "KILL")))


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

    # -- the run's identity (run_identity)

    def read_identity(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None

    def check_identity(self, expected: dict[str, Any], where: Path) -> None:
        """Refuse (JobError) to resume work whose identity differs, naming each difference."""
        reasons = identity_differences(self.read_identity() or {}, expected)
        if reasons:
            raise JobError(f"--resume: the unfinished run in {where} cannot be continued: it differs in "
                           f"{'; '.join(reasons)}. Its work is kept; run with the job it started with, or pass "
                           "--overwrite to start afresh")

    def write_identity(self, identity: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write(self.dir / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True).encode())

    def check_inputs(self, digest: IndexDigest, where: Path) -> None:
        """The first attempt's index digest is kept; a later attempt must have read the same inputs (a
        refusal names the shards that differ)."""
        path = IndexDigest.path(self)
        if not path.exists():
            self._write(path, digest.to_bytes())
            return
        try:
            found = json.loads(path.read_text())
        except ValueError:
            found = {}
        if found.get("sha256") == digest.hexdigest():
            return
        before, same = IndexDigest.recorded(self), IndexDigest.same
        names = [e["name"] for p, e in sorted(digest.shards.items()) if same(before.get(p)) != same(e)]
        names += [e["name"] for p, e in sorted(before.items()) if p not in digest.shards]
        shown = (f": {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")) if names else ""
        raise JobError(f"--resume: the input shards changed since the unfinished run in {where} started (the "
                       f"index pass read other samples{shown}); its work is kept. Restore the shards, or pass "
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


def publish_step() -> None:
    """A point of finishing and publishing where a test may kill the run (rded.staging)."""
    _kill_switch("publish")


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
