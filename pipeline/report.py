"""Accounting, timings and progress: every input sample ends in exactly one ledger row, every stage is
timed, long work shows a progress bar."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .tario import atomic_path, replace_durably

# Ledger statuses, in the order a sample can reach them.
SKIPPED = "skipped"  # with a reason (shards/README.md lists them)
EXCLUDED = "excluded_class"  # its class is not in data.class_subset
NOT_DRAWN = "not_drawn"  # not in the uniform per-class subset
SCORED = "scored"  # drawn and scored, but its key patch did not make the cut
DISTILLED = "distilled"  # its key patch is in a distilled image

EXAMPLES_PER_REASON = 20


def progress_bar(total: int, what: str, *, unit: str = "img", enabled: bool = True,
                 log_every_s: float = 15.0, initial: int = 0) -> tqdm:
    """A live bar on a terminal's stderr; in logs (stderr not a terminal) a line every `log_every_s`."""
    return tqdm(total=total, unit=unit, desc=f"rded: {what}", disable=not enabled, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else log_every_s, initial=initial)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@dataclass
class Stage:
    seconds: float = 0.0
    items: int = 0
    unit: str = "images"


@dataclass
class Timings:
    stages: dict[str, Stage] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str, items: int = 0, unit: str = "images"):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, items, unit)

    def add(self, name: str, seconds: float, items: int = 0, unit: str = "images") -> None:
        s = self.stages.setdefault(name, Stage(unit=unit))
        s.seconds += seconds
        s.items += items

    def as_dict(self) -> dict[str, Any]:
        return {name: {"seconds": round(s.seconds, 4), s.unit: s.items,
                       f"{s.unit}_per_s": round(s.items / s.seconds, 2) if s.seconds > 0 and s.items else None}
                for name, s in self.stages.items()}


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_field(text: str) -> str:
    """A key or shard name as one TSV field: backslash, tab, newline and carriage return as \\\\, \\t, \\n,
    \\r; any other character Python does not call printable (controls, line and paragraph separators) as
    \\xNN or \\uNNNN; everything else as is. Reversible, and no reader splits a row inside a field."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_ESCAPES.get(c) or (c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                                      else f"\\u{ord(c):04x}") for c in text)


class Ledger:
    """Ledger rows (key, shard, status, reason, offset) as samples are decided, written to a part file so
    the ledger costs no memory. Each row carries its place in the canonical order (the shard's position by
    name, then the offset), so `assemble_ledger` can put the parts of any number of ranks and attempts into
    one order. Keys and shard names are escaped (`escape_field`), so every sample is exactly one row for any
    TSV or `csv` reader. Counts are kept for messages during the run; report.json's come from the whole ledger."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(path, "w", encoding="utf-8", newline="")
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def record(self, key: str, shard: str, status: str, reason: str = "", offset: int = -1,
               position: int = 0) -> None:
        key, shard = escape_field(key), escape_field(shard)
        self._file.write(f"{position}\t{offset + 1}\t{key}\t{shard}\t{status}\t{reason}\t"
                         f"{offset if offset >= 0 else ''}\n")
        self.counts[status] += 1
        if status == SKIPPED:
            self.reasons[reason] += 1
            examples = self.examples.setdefault(reason, [])
            if len(examples) < EXAMPLES_PER_REASON:
                examples.append(f"{shard}:{key}" + (f"@{offset}" if offset >= 0 else ""))

    def close(self) -> None:
        self._file.close()

    def summary(self) -> dict[str, Any]:
        """Counts of this part, and its first skipped samples of each reason (in the order recorded)."""
        return {"input_samples": sum(self.counts.values()), DISTILLED: self.counts[DISTILLED],
                SCORED: self.counts[SCORED], NOT_DRAWN: self.counts[NOT_DRAWN], EXCLUDED: self.counts[EXCLUDED],
                SKIPPED: dict(sorted(self.reasons.items())), "skipped_examples": self.examples}


LEDGER_HEADER = "key\tshard\tstatus\treason\toffset\n"
SORT_CHUNK = 200_000  # rows sorted in memory at once when assembling the ledger (~30 MB)


def _sort_key(line: str) -> tuple[int, int, str]:
    position, offset, row = line.split("\t", 2)
    return int(position), int(offset), row  # the row itself (key first) breaks ties: any part order sorts alike


def assemble_ledger(parts: list[Path], out: Path) -> dict[str, Any]:
    """samples.tsv from ledger parts, in the canonical order (shard by name, offset, key) whatever rank or
    attempt wrote them; memory is bounded by an external merge of sorted chunks. Returns the accounting:
    counts per status and reason, and the first EXAMPLES_PER_REASON skipped samples of each reason."""
    import heapq
    import tempfile

    runs: list[Path] = []
    tmpdir = Path(tempfile.mkdtemp(prefix=".ledger-", dir=out.parent))
    chunk: list[str] = []

    def spill() -> None:
        chunk.sort(key=_sort_key)
        run = tmpdir / f"{len(runs)}.tsv"
        run.write_text("".join(chunk), encoding="utf-8")
        runs.append(run)
        chunk.clear()

    for part in parts:
        with open(part, encoding="utf-8", newline="") as src:
            for line in src:
                chunk.append(line)
                if len(chunk) >= SORT_CHUNK:
                    spill()
    if chunk or not runs:
        spill()
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    files = [open(r, encoding="utf-8", newline="") for r in runs]
    try:
        with open(atomic_ledger := atomic_path(out), "w", encoding="utf-8", newline="") as dst:
            dst.write(LEDGER_HEADER)
            for line in heapq.merge(*files, key=_sort_key):
                row = line.split("\t", 2)[2]
                key, shard, status, reason, offset = row.rstrip("\n").split("\t")
                counts[status] += 1
                if status == SKIPPED:
                    reasons[reason] += 1
                    kept = examples.setdefault(reason, [])
                    if len(kept) < EXAMPLES_PER_REASON:
                        kept.append(f"{shard}:{key}" + (f"@{offset}" if offset else ""))
                dst.write(row)
            dst.flush()
            os.fsync(dst.fileno())
        replace_durably(atomic_ledger, out)
    finally:
        for f in files:
            f.close()
        for r in runs:
            r.unlink()
        tmpdir.rmdir()
    return {"input_samples": sum(counts.values()), DISTILLED: counts[DISTILLED], SCORED: counts[SCORED],
            NOT_DRAWN: counts[NOT_DRAWN], EXCLUDED: counts[EXCLUDED], SKIPPED: dict(sorted(reasons.items())),
            "skipped_examples": examples}


def merge_accounting(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' ledger summaries as one."""
    merged: dict[str, Any] = {"input_samples": 0, DISTILLED: 0, SCORED: 0, NOT_DRAWN: 0, EXCLUDED: 0,
                              SKIPPED: {}, "skipped_examples": {}}
    for part in parts:
        for key in ("input_samples", DISTILLED, SCORED, NOT_DRAWN, EXCLUDED):
            merged[key] += part[key]
        for reason, n in part[SKIPPED].items():
            merged[SKIPPED][reason] = merged[SKIPPED].get(reason, 0) + n
        for reason, examples in part["skipped_examples"].items():
            kept = merged["skipped_examples"].setdefault(reason, [])
            kept.extend(examples[: EXAMPLES_PER_REASON - len(kept)])
    merged[SKIPPED] = dict(sorted(merged[SKIPPED].items()))
    return merged
