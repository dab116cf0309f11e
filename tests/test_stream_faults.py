"""Streams that survive transient faults (retries with backoff, Range resumption, timeouts), the broken-shard
policy (data.broken_shards) and resuming after an input failure: against a real HTTP server on 127.0.0.1
that misbehaves on purpose, real `pipe:` commands and real files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import struct
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import sample_keys
from rded.cli import main
from rded.config import load_job
from rded.dist import Ranks
from rded.distill import run_distill
from rded.source import broken_shards
from rded.streams import ForwardStream, RetryPolicy, StreamBroken, Streams
from test_resume import rded, run_files
from test_urls import SHARDS, ledger, same_outputs

FAST = {"retries": 5, "retry_backoff": 0.01, "read_timeout": 0.3, "connect_timeout": 2.0}
STALL_S = 2.0


@dataclass(frozen=True)
class Status:
    """Answer with this HTTP status (and an empty body)."""

    code: int
    retry_after: str | None = None
    location: str | None = None


@dataclass(frozen=True)
class Cut:
    """Send the headers of the whole response and a fraction `at` of its body, then `close` the connection (a
    body shorter than its Content-Length), `reset` it (RST) or `stall` (send nothing more for STALL_S)."""

    at: float
    how: str = "close"


Fault = Status | Cut | None
Plan = Callable[[int], Fault]  # the n-th request of a file (1-based) -> what goes wrong with it


def first(k: int, fault: Fault) -> Plan:
    return lambda n: fault if n <= k else None


def only(k: int, fault: Fault) -> Plan:
    return lambda n: fault if n == k else None


def always(fault: Fault) -> Plan:
    return lambda n: fault


@contextmanager
def fault_server(folder: Path, faults: dict[str, Plan] | None = None, ranges: bool = True):
    """Serves `folder` on 127.0.0.1, reading each file at each request (a test may heal or change it); the
    n-th request of a file gets `faults[name](n)` (the dict may change while it runs). With `ranges`: an
    ETag, and Range requests honoured (206) unless If-Range names another ETag; without: Range is ignored
    (200, the whole file). Yields (base URL, log of (file, n, status))."""
    faults = faults if faults is not None else {}
    log: list[tuple[str, int, int]] = []
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.lstrip("/")
            with lock:
                counts[name] += 1
                n = counts[name]
            fault = faults.get(name, lambda n: None)(n)
            path = folder / name
            if isinstance(fault, Status) or not path.is_file():
                status = fault or Status(404)
                log.append((name, n, status.code))
                self.send_response(status.code)
                for header, value in (("Retry-After", status.retry_after), ("Location", status.location)):
                    if value is not None:
                        self.send_header(header, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(asked[1]) if ranges and asked and self.headers.get("If-Range", etag) == etag else 0
            log.append((name, n, 206 if start else 200))
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if ranges:
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", formatdate(path.stat().st_mtime, usegmt=True))
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not isinstance(fault, Cut):
                self.wfile.write(body)
                return
            self.wfile.write(body[:int(len(body) * fault.at)])
            self.wfile.flush()
            if fault.how == "stall":
                time.sleep(STALL_S)
            elif fault.how == "reset":  # close with an RST rather than a FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        block_on_close = False

        def handle_error(self, request, client_address):  # a client that gave up on a stalled response
            pass

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def http_job(write_job, name: str, base: str, data: dict | None = None, **runtime) -> Path:
    """The tiny job over the server's two shards, with quick retries and a short read timeout."""
    return write_job(f"{name}.toml", data={"train": base + "/train-{000000..000001}.tar", **(data or {})},
                     runtime={**FAST, **runtime})


def local_names(base: str, data_dir: Path) -> dict[str, str]:
    return {f"{base}/{s}": str(data_dir / s) for s in SHARDS}


def statuses(log: list[tuple[str, int, int]], name: str) -> list[int]:
    return [status for file, _, status in log if file == name]


# -- transient faults: retried, and the run gives the uninterrupted local run's bytes

CASES = {  # name: (faults, Range support, what the retry's log line says)
    "503 on the first two requests": ({SHARDS[1]: first(2, Status(503))}, True, "HTTP 503"),
    "reset half-way, Range": ({SHARDS[0]: first(1, Cut(0.5, "reset"))}, True, "reset|closed after"),
    "reset half-way, no Range": ({SHARDS[0]: first(1, Cut(0.5, "reset"))}, False, "reset|closed after"),
    "stall, Range": ({SHARDS[0]: first(1, Cut(0.5, "stall"))}, True, r"timeout after 0\.3 s reading at byte \d+"),
    "short body, no Range": ({SHARDS[1]: first(1, Cut(0.4))}, False, r"the connection closed after \d+ of \d+ bytes"),
    "reset in the second pass": ({SHARDS[1]: only(2, Cut(0.1, "reset"))}, True, "reset|closed after"),
    "stall in the second pass, no Range": ({SHARDS[0]: only(2, Cut(0.1, "stall"))}, False, "timeout after 0.3 s"),
}


@pytest.mark.parametrize("case", CASES)
def test_transient_faults_are_retried_and_give_the_local_bytes(write_job, data_dir, baseline_run, tmp_path,
                                                               capfd, case):
    faults, ranges, cause = CASES[case]
    (name,) = faults
    with fault_server(data_dir, faults, ranges=ranges) as (base, log):
        out = tmp_path / "out"
        run_distill(load_job(http_job(write_job, "job", base)), out)
    same_outputs(out, baseline_run, local_names(base, data_dir))
    err = capfd.readouterr().err
    retry = re.search(rf"rded: retry 1 of 5: {re.escape(base)}/{name}: (.*); (.*) in \d+\.\d s", err)
    assert retry and re.search(cause, retry[1]), err
    resumed = 206 in statuses(log, name)
    if ranges and "503" not in case:
        assert resumed and retry[2] == "resuming with a Range request", (log, err)
    else:
        assert not resumed
    if not ranges and "503" not in case:
        assert retry[2].startswith("requesting it again and skipping the"), err


def test_a_pipe_command_that_fails_once_is_rerun(write_job, data_dir, baseline_run, tmp_path, capfd):
    marker, script = tmp_path / "failed-once", tmp_path / "flaky.sh"
    script.write_text(f'if [ -e {marker} ]; then cat "$1"; else touch {marker}; head -c 5000 "$1"; exit 1; fi\n')
    flaky = f"pipe:sh {script} {data_dir / SHARDS[1]}"  # ends in the shard's file name, as the outputs name it
    steady = f"pipe:cat {data_dir / SHARDS[0]}"
    out = tmp_path / "out"
    run_distill(load_job(write_job(data={"train": [steady, flaky]}, runtime=FAST)), out)
    same_outputs(out, baseline_run, {steady: str(data_dir / SHARDS[0]), flaky: str(data_dir / SHARDS[1])})
    err = capfd.readouterr().err
    assert (f"retry 1 of 5: {flaky}: the command exited with status 1 after 5000 bytes; rerunning the command and "
            "skipping the 5000 bytes already read") in err, err


# -- retries spent: exit 75 naming the shard, work kept, --resume after the source heals

@pytest.mark.parametrize("where", ["index", "second"])
def test_a_source_still_down_after_the_retries_is_exit_75_and_resume_heals(write_job, data_dir, baseline_run,
                                                                           tmp_path, capsys, where):
    faults = {SHARDS[1]: always(Status(503)) if where == "index" else (lambda n: Cut(0.1, "reset") if n > 1 else None)}
    out = tmp_path / "out"
    with fault_server(data_dir, faults) as (base, log):
        job = http_job(write_job, "job", base, retries=1)
        assert main(["distill", str(job), "--out", str(out)]) == 75
        err = capsys.readouterr().err
        assert f"{base}/{SHARDS[1]}: the stream broke off" in err and f"in the {where} pass" in err, err
        assert "(after 1 retries)" in err and "rerun with --resume when the source is back" in err
        assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
        if where == "second":  # the first shard's scoring is committed and kept
            assert len(list(out.glob(".rded-staging/.checkpoint/score/*.npz"))) == 1
        faults.clear()  # the source is back
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    same_outputs(out, baseline_run, local_names(base, data_dir))
    if where == "second":
        report = json.loads((out / "report.json").read_text())["checkpoint"]
        assert report["units_reused"] == {"score_shards": 1}


# -- a shard that ends without its end-of-archive blocks is truncated, never complete

def cut_between_samples(shard: Path) -> tuple[bytes, list[str]]:
    """The shard's bytes up to its middle sample's first header (a neat cut: no end-of-archive blocks), and the
    keys of the samples kept."""
    keys = sample_keys(shard)
    kept = keys[:len(keys) // 2]
    with tarfile.open(shard) as tar:
        at = next(m.offset for m in tar if m.name.split(".", 1)[0] == keys[len(kept)])
    return shard.read_bytes()[:at], kept


def cut_copy(data_dir: Path, folder: Path) -> list[str]:
    """The two shards copied into `folder`, the first cut between samples; returns the keys it keeps."""
    folder.mkdir()
    for s in SHARDS:
        shutil.copy(data_dir / s, folder / s)
    data, kept = cut_between_samples(data_dir / SHARDS[0])
    (folder / SHARDS[0]).write_bytes(data)
    return kept


def rows_of(out: Path, shard: str) -> list[tuple[str, str]]:
    return [(r["key"], r["reason"]) for r in ledger(out) if r["shard"] == shard]


def test_a_stream_cut_between_samples_is_broken_fail_then_heal(write_job, data_dir, baseline_run, tmp_path, capsys):
    folder = tmp_path / "src"
    kept = cut_copy(data_dir, folder)
    out = tmp_path / "out"
    with fault_server(folder) as (base, _):
        job = http_job(write_job, "job", base)
        assert main(["distill", str(job), "--out", str(out)]) == 75
        err = capsys.readouterr().err
        assert f"{base}/{SHARDS[0]}: the stream broke off at (after {kept[-1]}) in the index pass" in err, err
        assert "end-of-archive" in err
        shutil.copy(data_dir / SHARDS[0], folder / SHARDS[0])  # the source is whole again
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    same_outputs(out, baseline_run, local_names(base, data_dir))


def test_a_stream_cut_between_samples_is_counted_in_skip_mode(write_job, data_dir, tmp_path):
    folder = tmp_path / "src"
    kept = cut_copy(data_dir, folder)
    out = tmp_path / "out"
    with fault_server(folder) as (base, _):
        run_distill(load_job(http_job(write_job, "job", base, data={"broken_shards": "skip"})), out)
    rows = rows_of(out, f"{base}/{SHARDS[0]}")
    assert sorted(k for k, why in rows if why != "corrupt_shard") == sorted(kept)
    assert [row for row in rows if row[1] == "corrupt_shard"] == [(f"(after {kept[-1]})", "corrupt_shard")]


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_local_file_cut_between_samples(write_job, data_dir, tmp_path, capsys, policy):
    folder = tmp_path / "src"
    kept = cut_copy(data_dir, folder)
    job = write_job(data={"train": str(folder / "train-{000000..000001}.tar"), "broken_shards": policy})
    out = tmp_path / "out"
    if policy == "fail":
        assert main(["distill", str(job), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{folder / SHARDS[0]}: the tar file breaks off at (after {kept[-1]})" in err, err
        assert "no retry can fix it" in err and not (out / "manifest.json").exists()
        return
    run_distill(load_job(job), out)
    rows = rows_of(out, str(folder / SHARDS[0]))
    assert sorted(k for k, why in rows if why != "corrupt_shard") == sorted(kept)
    assert [row for row in rows if row[1] == "corrupt_shard"] == [(f"(after {kept[-1]})", "corrupt_shard")]
    accounting = json.loads((out / "report.json").read_text())["accounting"]
    assert accounting["skipped"]["corrupt_shard"] == 1
    assert accounting["input_samples"] == len(kept) + 1 + len(sample_keys(data_dir / SHARDS[1]))


# -- an input failure before a preemption does not change the run's identity

def test_a_503_before_a_preemption_does_not_refuse_the_resume(write_job, data_dir, baseline_run, tmp_path):
    out = tmp_path / "out"
    with fault_server(data_dir, {SHARDS[1]: first(1, Status(503))}) as (base, _):
        job = http_job(write_job, "job", base)
        killed = rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:3"})  # after a unit
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0  # not 2: "the input shards changed"
        assert f"retry 1 of 5: {base}/{SHARDS[1]}: HTTP 503" in killed.stderr
    same_outputs(out, baseline_run, local_names(base, data_dir))


def test_a_shard_skipped_before_a_preemption_is_replayed_on_resume(write_job, data_dir, tmp_path):
    """Skip mode: the first attempt counts a shard that stays broken; after a kill the source is back, and the
    resumed run still publishes what the uninterrupted run did (the break replayed at the same place)."""
    faults = {SHARDS[1]: always(Cut(0.5))}
    with fault_server(data_dir, faults) as (base, _):
        job = http_job(write_job, "job", base, data={"broken_shards": "skip"}, retries=0)
        run_distill(load_job(job), tmp_path / "uninterrupted")
        out = tmp_path / "out"
        killed = rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:3"})
        assert killed.returncode == -9, killed.stderr[-2000:]
        index = json.loads((out / ".rded-staging/.checkpoint/index.r0.json").read_text())["shards"]
        assert index["0"]["broken"] is None and index["1"]["broken"]["records"] > 0  # kept in the checkpoint
        faults.clear()  # the source is back
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 3  # published, a shard skipped
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 3  # and says so again when re-applied
        assert main(["distill", str(job), "--out", str(out), "--resume", "--check"]) == 3  # the launch files' check
    assert run_files(out) == run_files(tmp_path / "uninterrupted")
    lost = [r for r in ledger(out) if r["reason"] == "corrupt_shard"]
    assert [(r["shard"], r["key"]) for r in lost] == [(f"{base}/{SHARDS[1]}", index["1"]["broken"]["at"])]
    (broken,) = json.loads((out / "manifest.json").read_text())["broken_shards"]
    assert (broken["shard"], broken["pass"], broken["at"], broken["samples"]) == (
        f"{base}/{SHARDS[1]}", "index", index["1"]["broken"]["at"], 1)


def test_a_shard_whole_before_a_preemption_and_broken_now_is_75_not_refused(write_job, data_dir, baseline_run,
                                                                            tmp_path, capsys):
    faults: dict[str, Plan] = {}
    out = tmp_path / "out"
    with fault_server(data_dir, faults) as (base, _):
        job = http_job(write_job, "job", base, data={"broken_shards": "skip"}, retries=0)
        killed = rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:3"})
        assert killed.returncode == -9, killed.stderr[-2000:]
        faults[SHARDS[1]] = always(Status(503))  # down now
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 75
        err = capsys.readouterr().err
        assert f"{base}/{SHARDS[1]}: the stream broke off at (start)" in err and "read it whole" in err, err
        faults.clear()
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    same_outputs(out, baseline_run, local_names(base, data_dir))


def test_a_shard_broken_in_the_second_pass_is_kept_beside_its_unit(write_job, data_dir, tmp_path):
    """Skip mode: drawn images a stream cannot deliver are corrupt_shard rows, and the break (where, why, how
    many) is committed beside the shard's score unit, so a resumed run can still report it."""
    faults = {SHARDS[1]: only(2, Cut(0.1))}  # the first attempt's second pass
    out = tmp_path / "out"
    with fault_server(data_dir, faults) as (base, _):
        job = http_job(write_job, "job", base, data={"broken_shards": "skip"}, retries=0)
        killed = rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:4"})  # both units
        assert killed.returncode == -9, killed.stderr[-2000:]
        (sidecar,) = out.glob(".rded-staging/.checkpoint/score/*.broken.json")
        lost = json.loads(sidecar.read_text())
        assert "closed after" in lost["cause"] and lost["samples"] > 0
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 3
    rows = [r for r in ledger(out) if r["reason"] == "corrupt_shard"]
    assert len(rows) == lost["samples"] and lost["at"] in {r["key"] for r in rows}
    assert {r["shard"] for r in rows} == {f"{base}/{SHARDS[1]}"}
    (broken,) = json.loads((out / "manifest.json").read_text())["broken_shards"]
    assert (broken["shard"], broken["pass"], broken["samples"]) == (f"{base}/{SHARDS[1]}", "fetch", lost["samples"])
    assert json.loads((out / "report.json").read_text())["broken_shards"] == [broken]


def test_broken_shards_are_merged_in_shard_name_order():
    streams = Streams()
    streams.note_broken("http://h/b.tar", "fetch", "k9", "reset", 3)
    streams.note_broken("http://h/b.tar", "index", "(after k8)", "truncated", 1)
    streams.note_broken("http://h/a.tar", "index", "(start)", "HTTP 503", 1)
    got = broken_shards(SimpleNamespace(ranks=Ranks(), streams=streams))
    assert [(b["shard"], b["pass"], b["samples"]) for b in got] == [
        ("http://h/a.tar", "index", 1), ("http://h/b.tar", "index", 1), ("http://h/b.tar", "fetch", 3)]
    assert set(got[0]) == {"shard", "pass", "at", "cause", "samples"}


# -- the stream itself

def read_all(url: str, policy: RetryPolicy) -> tuple[bytes, Streams]:
    streams = Streams(policy)
    with ForwardStream(url, streams) as f:
        return f.read(), streams


def test_a_stall_is_a_logged_and_counted_timeout(data_dir, capfd):
    with fault_server(data_dir, {SHARDS[0]: first(1, Cut(0.5, "stall"))}) as (base, log):
        data, streams = read_all(f"{base}/{SHARDS[0]}", RetryPolicy(retries=2, backoff=0.01, read_timeout=0.3))
    assert data == (data_dir / SHARDS[0]).read_bytes()
    assert statuses(log, SHARDS[0]) == [200, 206]
    assert streams.as_dict() == {"retries": 1, "retries_by_cause": {"timeout": 1}, "retried_shards": 1,
                                 "shards_given_up": 0, "given_up": []}
    err = capfd.readouterr().err
    assert re.search(rf"rded: retry 1 of 2: {re.escape(base)}/{SHARDS[0]}: timeout after 0\.3 s reading at byte "
                     r"\d+; resuming with a Range request in 0\.0 s", err), err


def test_a_resource_changed_between_tries_is_not_spliced(data_dir, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    shutil.copy(data_dir / SHARDS[0], folder / "x.tar")

    def plan(n: int) -> Fault:
        if n == 2:  # before the retry is served: another resource under the same name
            shutil.copy(data_dir / SHARDS[1], folder / "x.tar")
        return Cut(0.5) if n == 1 else None

    with fault_server(folder, {"x.tar": plan}) as (base, log):
        with pytest.raises(StreamBroken, match="changed while being read"):
            read_all(f"{base}/x.tar", RetryPolicy(retries=3, backoff=0.01))
    assert statuses(log, "x.tar") == [200, 200]  # If-Range: the changed resource came whole, and was refused


def test_retry_after_and_redirects_and_permanent_errors(data_dir, capfd):
    faults = {SHARDS[0]: first(1, Status(503, retry_after="1")), SHARDS[1]: first(1, Cut(0.5, "reset")),
              "moved.tar": always(Status(302, location=f"/{SHARDS[1]}")), "gone.tar": always(Status(403)),
              "later.tar": always(Status(429, retry_after="30"))}
    with fault_server(data_dir, faults) as (base, log):
        started = time.monotonic()
        data, _ = read_all(f"{base}/{SHARDS[0]}", RetryPolicy(backoff=0.01))
        assert data == (data_dir / SHARDS[0]).read_bytes() and time.monotonic() - started >= 1.0
        assert "HTTP 503 Service Unavailable; requesting it again in 1.0 s" in capfd.readouterr().err
        data, _ = read_all(f"{base}/moved.tar", RetryPolicy(backoff=0.01))  # followed, and resumed at the target
        assert data == (data_dir / SHARDS[1]).read_bytes() and 206 in statuses(log, SHARDS[1])
        with pytest.raises(StreamBroken, match=r"HTTP 403 Forbidden \(not retried\)"):
            read_all(f"{base}/gone.tar", RetryPolicy(backoff=0.01))
        with pytest.raises(StreamBroken, match="stream_deadline"):  # Retry-After past the deadline: no wait
            read_all(f"{base}/later.tar", RetryPolicy(backoff=0.01, deadline=5))
    assert statuses(log, "gone.tar") == [403] and statuses(log, "later.tar") == [429]


def test_backoff_is_exponential_capped_and_its_jitter_keyed():
    policy = RetryPolicy(backoff=1.0)
    for attempt in range(1, 12):
        base = min(2.0 ** (attempt - 1), 60.0)
        wait = policy.wait("http://h/a.tar", attempt)
        assert base <= wait <= 1.5 * base and wait == policy.wait("http://h/a.tar", attempt)
    assert policy.wait("http://h/a.tar", 3) != policy.wait("http://h/b.tar", 3)
