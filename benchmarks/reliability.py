"""What the run contract costs (docs/performance.md, "Reliability"):

1. fsync: the ImageWoof job (jobs/imagewoof.toml, IPC 10) run once, every os.fsync timed: their count and
   seconds against the job's seconds.
2. the retries' bookkeeping: the index pass (a header walk of every train shard) read over HTTP from a
   server on 127.0.0.1, fault-free, repeated; against the same walk of the local files, and against the
   same HTTP walk by the code of `--baseline-rev` (before streams were retried), in a git worktree.
3. one retried shard: the same walk with one connection reset half-way through one shard, with the
   server answering Range requests and without (the retry then refetches from the start and skips what it
   had), with no backoff wait (the wait, 1 s by default, comes on top).

    .venv/bin/python benchmarks/reliability.py [--skip-job] [--repeats 3] [--baseline-rev a561f4f]
                                               [--out out/reliability.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "imagewoof"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed_fsync_job(out: Path) -> dict:
    """The ImageWoof job with every fsync timed (os.fsync wrapped in this process only)."""
    from rded.config import load_job
    from rded.distill import run_distill

    spent, count = [0.0], [0]
    real = os.fsync

    def fsync(fd):
        t0 = time.perf_counter()
        real(fd)
        spent[0] += time.perf_counter() - t0
        count[0] += 1

    os.fsync = fsync
    try:
        t0 = time.perf_counter()
        run_distill(load_job(ROOT / "jobs" / "imagewoof.toml", ["runtime.progress=false"]), out, overwrite=True)
        seconds = time.perf_counter() - t0
    finally:
        os.fsync = real
    report = json.loads((out / "report.json").read_text())
    return {"job_seconds": round(seconds, 1), "fsync_calls": count[0], "fsync_seconds": round(spent[0], 3),
            "fsync_share": round(spent[0] / seconds, 5), "commit_seconds": report["checkpoint"]["commit_seconds"]}


def serve(folder: Path, *, ranges: bool, reset: dict[str, int]):
    """A static server for `folder`; `reset` {name: n}: the n-th request for that file is cut half-way."""
    requests: Counter[str] = Counter()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            name = self.path.lstrip("/")
            requests[name] += 1
            data = (folder / name).read_bytes()
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) if ranges else None
            if m:
                start = int(m.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            if ranges:  # with a validator, as object stores send: If-Range needs one
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Last-Modified", self.date_time_string((folder / name).stat().st_mtime))
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            if reset.get(name) == requests[name]:
                body = body[: len(body) // 2]
                self.close_connection = True
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


def walk_all(names: list[str], backoff: float = 0.0) -> tuple[float, int]:
    """The index pass's reads (rded.source.scan_shard, retrying as a job does) over every shard; seconds and
    records."""
    from rded.config import job_from_dict
    from rded.source import expand_shards, scan_shard
    from rded.streams import RetryPolicy, Streams

    job = job_from_dict({"data": {"train": names}, "observer": {"kind": "efficientnet-lite0"},
                         "runtime": {"retry_backoff": backoff, "progress": False}}, base_dir=DATA)
    streams = Streams(RetryPolicy.of(job.runtime))
    t0 = time.perf_counter()
    records = 0
    for i, shard in enumerate(expand_shards(job)):
        records += sum(1 for _ in scan_shard(i, shard, streams))
    return time.perf_counter() - t0, records


OLD_WALK = """
import sys, time
from rded.config import job_from_dict
from rded.source import expand_shards, scan_shard
job = job_from_dict({"data": {"train": sys.argv[1:]}, "observer": {"kind": "efficientnet-lite0"}}, base_dir=".")
t0 = time.perf_counter()
n = sum(1 for i, s in enumerate(expand_shards(job)) for _ in scan_shard(i, s))
print(time.perf_counter() - t0, n)
"""


def baseline_walk(rev: str, urls: list[str], repeats: int) -> float:
    """The same HTTP walk with the code of `rev` (a worktree whose pipeline/ is imported as rded)."""
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="rded-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "tree"), rev], check=True,
                   capture_output=True)
    try:
        (tmp / "pkg").mkdir()
        (tmp / "pkg" / "rded").symlink_to(tmp / "tree" / "pipeline")
        times = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", OLD_WALK, *urls], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(tmp / "pkg")}).stdout.split()
            times.append(float(out[0]))
        return min(times)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "tree")], check=True)


def walks(repeats: int, baseline_rev: str | None) -> dict:
    shards = sorted(p.name for p in DATA.glob("train-*.tar"))
    result = {"shards": len(shards), "bytes": sum((DATA / s).stat().st_size for s in shards)}
    local = [walk_all([str(DATA / s)])[0] for s in shards for _ in range(repeats)]
    result["local_s"] = round(sum(local) / repeats, 3)
    for ranges in (True, False):
        server, _ = serve(DATA, ranges=ranges, reset={})
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        clean = [walk_all([base + s for s in shards])[0] for _ in range(repeats)]
        baseline = baseline_walk(baseline_rev, [base + s for s in shards], repeats) if baseline_rev else None
        server.shutdown()
        server, requests = serve(DATA, ranges=ranges, reset={shards[0]: 1})
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        retried, records = walk_all([base + s for s in shards])
        server.shutdown()
        key = "http_ranges" if ranges else "http_no_ranges"
        result[key] = {"clean_s": round(min(clean), 3), "clean_before_retries_s": baseline and round(baseline, 3),
                       "one_reset_s": round(retried, 3),
                       "one_reset_extra_s": round(retried - min(clean), 3), "records": records,
                       "requests_for_the_reset_shard": requests[shards[0]]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-job", action="store_true", help="only the stream measurements")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-rev", default=None, help="also time the HTTP walk with this git revision's code")
    p.add_argument("--out", default=str(ROOT / "out" / "reliability.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "walks": walks(args.repeats, args.baseline_rev)}
    print(json.dumps(result, indent=2), flush=True)
    if not args.skip_job:
        result["job"] = timed_fsync_job(ROOT / "out" / "reliability-job")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
