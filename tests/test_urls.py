"""Shards from URLs: http(s)://, pipe: and file: give the same outputs as local files, each streamed shard
is read at most twice, and a source that still fails mid-shard after its retries is counted (with
data.broken_shards = "skip"), never silently short. Transient faults: test_stream_faults.py."""

from __future__ import annotations

import csv
import json
import threading
from collections import Counter
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rded.cli import main
from rded.config import load_job
from rded.distill import run_distill

from conftest import NUM_CLASSES, sample_keys

SHARDS = ("train-000000.tar", "train-000001.tar")


@contextmanager
def serve(folder: Path, drop: dict[str, int] | None = None):
    """An HTTP server for `folder` on 127.0.0.1; `drop` {file name: n}: from the n-th request for that file on
    (1-based), it announces the full Content-Length but closes after half the bytes. Yields (base URL, requests)."""
    requests: Counter[str] = Counter()
    drop = drop or {}

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            name = self.path.lstrip("/")
            requests[name] += 1
            if name in drop and requests[name] >= drop[name]:
                data = (folder / name).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def skip(retries: int = 1) -> dict[str, dict]:
    """Job sections where a shard that stays broken after `retries` quick retries is counted as skipped."""
    return {"data": {"broken_shards": "skip"}, "runtime": {"retries": retries, "retry_backoff": 0.01}}


def run(write_job, tmp_path: Path, name: str, train: str, **sections) -> Path:
    out = tmp_path / name
    sections["data"] = {**sections.get("data", {}), "train": train}
    run_distill(load_job(write_job(f"{name}.toml", **sections)), out)
    return out


def ledger(out: Path) -> list[dict]:
    with open(out / "samples.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def same_outputs(out: Path, local: Path, names: dict[str, str]) -> None:
    """Byte-identical image and label shards; the same ledger but for the shard names (`names`: ours ->
    the local run's), which samples.tsv records as the job wrote them."""
    a, b = json.loads((out / "manifest.json").read_text()), json.loads((local / "manifest.json").read_text())
    assert a["shards"] == b["shards"]  # names, tiers, sizes and sha256 of image and label shards
    assert a["labels"] == b["labels"]
    for s in a["shards"]:
        assert (out / s["name"]).read_bytes() == (local / s["name"]).read_bytes()

    def rows(run: Path, f=lambda s: s) -> list[tuple]:  # sorted: ranks' ledgers are concatenated
        return sorted((r["key"], f(r["shard"]), r["status"], r["reason"], r["offset"]) for r in ledger(run))
    assert rows(out, lambda s: names.get(s, s)) == rows(local)


def test_http_shards_match_local_files_and_are_read_at_most_twice(write_job, data_dir, baseline_run, tmp_path):
    with serve(data_dir) as (base, requests):
        out = run(write_job, tmp_path, "http", base + "/train-{000000..000001}.tar")
    assert set(requests) == set(SHARDS)
    assert max(requests.values()) <= 2, requests
    same_outputs(out, baseline_run, {f"{base}/{s}": str(data_dir / s) for s in SHARDS})
    assert not (out / ".streamed").exists()


def test_pipe_and_file_shards_match_local_files(write_job, data_dir, baseline_run, tmp_path):
    out = run(write_job, tmp_path, "pipe", f"pipe:cat {data_dir}/train-{{000000..000001}}.tar")
    same_outputs(out, baseline_run, {f"pipe:cat {data_dir / s}": str(data_dir / s) for s in SHARDS})
    out = run(write_job, tmp_path, "file", f"file:{data_dir}/train-{{000000..000001}}.tar")
    same_outputs(out, baseline_run, {f"file:{data_dir / s}": str(data_dir / s) for s in SHARDS})


def test_connection_dropped_in_the_second_pass_is_counted(write_job, data_dir, baseline_run, tmp_path):
    with serve(data_dir, drop={SHARDS[1]: 2}) as (base, requests):
        out = run(write_job, tmp_path, "drop2", base + "/train-{000000..000001}.tar", distill={"subset": 100},
                  **skip())
    assert requests == {SHARDS[0]: 2, SHARDS[1]: 3}  # the second pass's read, retried once
    rows = ledger(out)
    all_keys = [(k, s) for s in SHARDS for k in sample_keys(data_dir / s)]
    assert sorted((r["key"], r["shard"].rsplit("/", 1)[1]) for r in rows) == sorted(all_keys)  # each once
    lost = [r for r in rows if r["reason"] == "corrupt_shard"]
    assert lost and all(r["shard"] == f"{base}/{SHARDS[1]}" for r in lost)
    report = json.loads((out / "report.json").read_text())
    assert report["accounting"]["skipped"]["corrupt_shard"] == len(lost)
    assert (out / "manifest.json").is_file()


def test_connection_dropped_in_the_index_pass_keeps_what_came_before(write_job, data_dir, tmp_path):
    with serve(data_dir, drop={SHARDS[0]: 1}) as (base, requests):
        out = run(write_job, tmp_path, "drop1", base + "/train-{000000..000001}.tar", **skip())
    rows = ledger(out)
    lost = [r for r in rows if r["reason"] == "corrupt_shard"]
    assert len(lost) == 1 and lost[0]["shard"] == f"{base}/{SHARDS[0]}"
    kept = [r for r in rows if r["shard"] == f"{base}/{SHARDS[0]}" and r["reason"] != "corrupt_shard"]
    assert 0 < len(kept) < len(sample_keys(data_dir / SHARDS[0]))
    assert requests[SHARDS[0]] <= 3 and requests[SHARDS[1]] == 2  # the index pass's read retried once


def test_missing_url_is_a_corrupt_shard(write_job, data_dir, tmp_path):
    with serve(data_dir) as (base, requests):
        out = run(write_job, tmp_path, "missing", [base + "/train-000000.tar", base + "/nope.tar"], **skip())
    lost = [r for r in ledger(out) if r["reason"] == "corrupt_shard"]
    assert [(r["key"], r["shard"]) for r in lost] == [("(start)", base + "/nope.tar")]
    assert requests["nope.tar"] == 1  # a 404 is permanent: not retried


def test_pipe_that_exits_non_zero_is_counted(write_job, data_dir, tmp_path):
    failing = f"pipe:cat {data_dir / SHARDS[1]}; exit 3"
    cut = f"pipe:head -c 30000 {data_dir / SHARDS[0]}"
    out = run(write_job, tmp_path, "pipefail", [cut, failing], **skip())
    lost = {r["shard"]: r for r in ledger(out) if r["reason"] == "corrupt_shard"}
    assert set(lost) == {cut, failing}
    assert lost[failing]["key"].startswith("(after ")  # every sample came through: all kept
    n = len(sample_keys(data_dir / SHARDS[1]))
    assert sum(1 for r in ledger(out) if r["shard"] == failing) == n + 1
    assert json.loads((out / "manifest.json").read_text())["classes"][NUM_CLASSES - 1]["drawn"] > 0


def test_no_readable_shard_is_one_error_not_an_empty_run(write_job, data_dir, tmp_path, capsys):
    with serve(data_dir) as (base, _):
        job = write_job(data={"train": [base + "/nope-0.tar", base + "/nope-1.tar"], "broken_shards": "skip"})
        rc = main(["distill", str(job), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable sample in 2 shards" in err and "2 corrupt_shard" in err, err
    assert base + "/nope-0.tar" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


@pytest.mark.parametrize("train", ["ftp://example.org/train-000000.tar", "s3://bucket/train.tar"])
def test_unsupported_url_scheme_is_exit_2(write_job, tmp_path, capsys, train):
    rc = main(["distill", str(write_job(data={"train": train})), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "data.train" in err and "scheme" in err, err


def test_a_url_listed_twice_is_exit_2(write_job, tmp_path, capsys):
    url = "http://127.0.0.1:9/train-000000.tar"
    rc = main(["distill", str(write_job(data={"train": [url, url]})), "--out", str(tmp_path / "o")])
    assert rc == 2 and "twice" in capsys.readouterr().err


def test_two_ranks_over_pipe_shards_match_one_process(write_job, data_dir, baseline_run, tmp_path):
    """Under torchrun (split by shard) a streamed shard is read three times: the ranks' key exchange, the
    index pass and the fetch of drawn images; winners come from the spool, whichever rank scored them."""
    from test_distributed import torchrun

    log = tmp_path / "reads.log"
    train = [f"pipe:echo {n} >> {log}; cat {data_dir}/train-{n}.tar" for n in ("000000", "000001")]
    out = tmp_path / "two"
    proc = torchrun("distill", str(write_job(data={"train": train})), "--out", str(out))
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert Counter(log.read_text().split()) == {"000000": 3, "000001": 3}
    same_outputs(out, baseline_run, {t: str(data_dir / t.rsplit("/", 1)[1]) for t in train})
    assert not list(out.glob(".*"))


def test_a_stream_that_changed_since_the_index_pass_is_caught(data_dir, tmp_path):
    from rded.records import SampleRef, Shard
    from rded.source import scan_shard
    from rded.streams import MemberFetcher, StreamBroken

    refs = [r for r in scan_shard(0, data_dir / SHARDS[0]) if isinstance(r, SampleRef)]
    same = MemberFetcher([Shard("a", None, f"pipe:cat {data_dir / SHARDS[0]}")], tmp_path / "a")
    assert [same(0, r.offset, r.size) for r in refs[:3]] == [(data_dir / SHARDS[0]).read_bytes()[r.offset:r.offset + r.size]
                                                            for r in refs[:3]]
    same.close()
    other = MemberFetcher([Shard("b", None, f"pipe:cat {data_dir / SHARDS[1]}")], tmp_path / "b")
    with pytest.raises(StreamBroken, match="differs"):
        for r in refs:
            other(0, r.offset, r.size)
    other.close()


def test_output_names_are_file_names_unless_they_collide():
    from rded.source import output_names

    assert output_names(["../d/train-0.tar", "http://h/x/train-1.tar?sig=1", "pipe:cat /a/train-2.tar"]) == \
        ["train-0.tar", "train-1.tar", "train-2.tar"]
    assert output_names(["/data/a/x.tar", "/data/b/x.tar"]) == ["a/x.tar", "b/x.tar"]
    assert output_names(["http://h/data/a/x.tar", "http://h/data/b/x.tar"]) == ["a/x.tar", "b/x.tar"]


def test_spool_finishes_each_shard_before_the_next(tmp_path):
    """One spool file open at a time (ImageNet has 1,024 shards; the default limit is 1,024 open files); each
    member indexed with its CRC-32, and a damaged spool is caught, never read as winners' bytes."""
    import zlib

    import numpy as np

    from rded.records import Shard
    from rded.streams import MemberSpool, SpooledMembers, spool_is_whole

    spool = MemberSpool(tmp_path, rank=0)
    spool.put(0, 512, b"a" * 10)
    spool.put(0, 2048, b"b" * 5)
    assert not (tmp_path / "r0-s0.npy").exists()
    spool.put(3, 512, b"c" * 7)
    assert np.load(tmp_path / "r0-s0.npy").tolist() == [[512, 0, 10, zlib.crc32(b"a" * 10)],
                                                        [2048, 10, 5, zlib.crc32(b"b" * 5)]]
    with pytest.raises(RuntimeError):
        spool.put(0, 4096, b"d")
    spool.close()
    spool.seal(5)  # a shard none of whose members was kept: an empty spool, which is whole
    assert np.load(tmp_path / "r0-s3.npy").tolist() == [[512, 0, 7, zlib.crc32(b"c" * 7)]]
    assert (tmp_path / "r0-s3.bin").read_bytes() == b"c" * 7
    assert spool_is_whole(tmp_path, 0, 0) and spool_is_whole(tmp_path, 0, 5) and not spool_is_whole(tmp_path, 0, 1)
    (tmp_path / "r0-s0.bin").write_bytes(b"a" * 9 + b"X" + b"b" * 5)  # damaged on disk
    assert not spool_is_whole(tmp_path, 0, 0)
    shards = [Shard(f"http://x/{i}.tar", None, f"http://x/{i}.tar") for i in range(4)]
    with pytest.raises(OSError, match="damaged"):
        SpooledMembers(shards, tmp_path)(0, 512, 10)
    assert SpooledMembers(shards, tmp_path)(0, 2048, 5) == b"b" * 5
