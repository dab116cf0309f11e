"""The job under torchrun (2 CPU ranks, gloo): byte-identical to one process, and a dead rank fails it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """torchrun as users launch it: it sets OMP_NUM_THREADS=1 for the workers itself."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | (env or {})
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "rded", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_ranks_give_the_single_process_output(baseline_run, write_job, tmp_path):
    """Not forced to one thread: the single process runs torch's default threads, each rank torchrun's one."""
    out = tmp_path / "two"
    proc = torchrun("distill", str(write_job()), "--out", str(out))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    threads = [json.loads((d / "report.json").read_text())["threads"] for d in (baseline_run, out)]
    assert threads == [torch.get_num_threads(), 1]
    names = sorted(p.name for p in baseline_run.glob("*.tar"))
    assert names == sorted(p.name for p in out.glob("*.tar")) and any(n.startswith("labels-") for n in names)
    for name in names:  # distilled and soft-label shards
        assert (out / name).read_bytes() == (baseline_run / name).read_bytes(), name
    assert (out / "manifest.json").read_bytes() == (baseline_run / "manifest.json").read_bytes()
    # one canonical order, whatever the rank count
    assert (out / "samples.tsv").read_bytes() == (baseline_run / "samples.tsv").read_bytes()
    assert not list(out.glob(".*"))


def children_with_rank(parent: int, rank: str) -> list[int]:
    """Worker processes below `parent` whose environment says RANK=rank."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_worker = any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in env)
        if is_worker and f"RANK={rank}".encode() in env and int(pid) != parent:
            found.append(int(pid))
    return found


def test_a_killed_rank_fails_the_job_cleanly(write_job, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun("distill", str(write_job(relabel={"views": 3000})), "--out", str(out))
    deadline = time.time() + 300
    while not list(out.glob(".rded-staging/distilled-*.tar")) and time.time() < deadline:
        time.sleep(0.1)
    victims = children_with_rank(proc.pid, "1")
    assert proc.poll() is None and victims, "the job ended before a rank could be killed"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rank      : 1" in stderr and "SIGKILL" in stderr  # torchrun names the rank and the cause
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tar"))


def test_two_ranks_keep_the_same_copy_of_a_repeated_key(data_dir, tmp_path):
    """A key in both shards, which two ranks read apart: the ranks exchange key hashes, so the copy in the
    shard first by name wins, as in one process."""
    from test_bad_input import job, normal, sample, write_tar

    from rded.config import load_job
    from rded.distill import run_distill

    first = write_tar(tmp_path / "s-000.tar", normal("a") + sample("dup", 1, 905))
    second = write_tar(tmp_path / "s-001.tar", sample("dup", 1, 906) + normal("b"))
    path = job(tmp_path, data_dir, [second, first])
    run_distill(load_job(path), tmp_path / "one")
    proc = torchrun("distill", str(path), "--out", str(tmp_path / "two"))
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    for name in sorted(p.name for p in (tmp_path / "one").glob("*.tar")):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    one, two = ((tmp_path / d / "samples.tsv").read_text().splitlines() for d in ("one", "two"))
    assert sorted(one) == sorted(two)
    assert sum("duplicate_key" in line for line in two) == 1


def is_stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "T"


def test_every_rank_waits_for_the_publish_and_ends_with_its_outcome(baseline_run, write_job, tmp_path):
    """Rank 0 is paused inside publishing: rank 1 must still be waiting (it used to exit 0 before rank 0
    published, so a failed publish left the other nodes' pods Succeeded)."""
    out = tmp_path / "out"
    proc = torchrun("distill", str(write_job()), "--out", str(out),
                    env={"RDED_TEST_KILL": "publish:2", "RDED_TEST_KILL_SIGNAL": "STOP", "RDED_TEST_KILL_RANK": "0"})
    deadline = time.time() + 300
    while not (rank0 := [p for p in children_with_rank(proc.pid, "0") if is_stopped(p)]) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    assert rank0, "rank 0 did not reach publishing"
    time.sleep(2)
    assert children_with_rank(proc.pid, "1"), "rank 1 exited before rank 0 published"
    os.kill(rank0[0], signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert (out / "manifest.json").read_bytes() == (baseline_run / "manifest.json").read_bytes()


def test_a_hung_rank_fails_the_run_after_the_job_s_timeout(write_job, tmp_path):
    """A peer that stops answering (here SIGSTOPped after its first shard) fails the others at the next
    collective after runtime.dist_timeout, instead of blocking them for torch's 10-30 minutes."""
    out = tmp_path / "out"
    started = time.time()
    proc = torchrun("distill", str(write_job(runtime={"dist_timeout": 5.0, "batch_size": 8, "dali_threads": 1,
                                                      "progress": False})), "--out", str(out),
                    env={"RDED_TEST_KILL": "event:1", "RDED_TEST_KILL_SIGNAL": "STOP", "RDED_TEST_KILL_RANK": "1"})
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        for pid in children_with_rank(proc.pid, "1"):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - started < 200
    assert not (out / "manifest.json").exists()
