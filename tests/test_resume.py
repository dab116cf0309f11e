"""Preemption and restarts: a run killed anywhere (SIGKILL) and resumed with --resume publishes the same bytes
as a run never interrupted; resumes that cannot be trusted are refused; torchrun restarts and two-node
launches give the single-process run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_tree
from rded.cli import main
from rded.config import load_job
from rded.distill import run_distill

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
REFINE = {"enabled": True, "iterations": 4, "resolutions": [32, 32], "jitter": 4, "lr": 0.1}


def run_files(out: Path) -> dict[str, bytes]:
    """Everything a finished run publishes except report.json (its timings differ by design)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "report.json"}


def rded(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rded", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def every_stage(tmp_path_factory, data_dir):
    """A job with every kind of unit (index pass, scoring, refinement, output shards) and its uninterrupted run."""
    from conftest import job_text

    tmp = tmp_path_factory.mktemp("resume")
    job = tmp / "job.toml"
    job.write_text(job_text(data_dir, observer={"kind": "small-cnn", "weights": str(data_dir / "observer-state.pt")},
                            refine=REFINE))
    run_distill(load_job(job), tmp / "reference")
    return job, tmp / "reference"


# Kill points. The checkpoint events of a run of this job are, in order: 2 shards indexed, 2 input shards
# scored, 2 refine batches, then 2 output shards of 2 commits each (thumbnails, then the shard's record). The
# renames are those of run.json, the index digest, the 2 score units and the 4 output commits.
EVENTS = ["index", "index", "score", "score", "refine", "refine", "out-npz", "out-json", "out-npz", "out-json"]
KILLS = ["event:1", "event:3", "event:4", "event:5", "event:6", "event:8", "event:9", "rename:3", "rename:6"]


@pytest.mark.parametrize("kill", KILLS)
def test_killed_anywhere_and_resumed_gives_the_uninterrupted_bytes(every_stage, tmp_path, kill):
    job, reference = every_stage
    out = tmp_path / "out"
    killed = rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": kill})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    if kill.startswith("rename"):  # killed inside a commit: the unit's temporary file is there, the unit is not
        assert list(out.glob(".rded-staging/**/.*.partial"))
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    assert run_files(out) == run_files(reference)
    assert not (out / ".rded-staging").exists()
    report = json.loads((out / "report.json").read_text())["checkpoint"]
    assert report["resumed"] is True
    n = int(kill.split(":")[1])
    if kill.startswith("event"):  # exactly what was committed before the kill is reused, the rest computed
        done = EVENTS[:n]
        expected = {"score_shards": done.count("score"), "refine_batches": done.count("refine"),
                    "output_shards": done.count("out-json")}
        assert report["units_reused"] == {k: v for k, v in expected.items() if v}
        assert report["units_computed"].get("score_shards", 0) == 2 - done.count("score")


def test_killed_twice_and_resumed_twice(every_stage, tmp_path):
    job, reference = every_stage
    out = tmp_path / "out"
    assert rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:4"}).returncode == -9
    assert rded("distill", str(job), "--out", str(out), "--resume", env={"RDED_TEST_KILL": "event:5"}).returncode == -9
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    assert run_files(out) == run_files(reference)


def test_a_damaged_unit_is_redone_not_trusted(every_stage, tmp_path):
    job, reference = every_stage
    out = tmp_path / "out"
    assert rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:6"}).returncode == -9
    units = sorted(out.glob(".rded-staging/.checkpoint/score/*.npz"))
    assert len(units) == 2
    units[0].write_bytes(units[0].read_bytes()[:100])  # torn by something outside rded
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    assert run_files(out) == run_files(reference)
    report = json.loads((out / "report.json").read_text())["checkpoint"]
    assert report["units_computed"]["score_shards"] == 1 and report["units_reused"]["score_shards"] == 1


def killed_run(job: Path, out: Path) -> dict[str, bytes]:
    assert rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:5"}).returncode == -9
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_refuses_a_changed_job_and_keeps_the_work(every_stage, tmp_path, capsys):
    job, _ = every_stage
    out = tmp_path / "out"
    before = killed_run(job, out)
    assert main(["distill", str(job), "--out", str(out), "--resume", "--set", "distill.seed=1"]) == 2
    err = capsys.readouterr().err
    assert "it differs in distill.seed (0, now 1)" in err and "--overwrite" in err
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == {k: v for k, v in before.items() if k != ".rded.lock"}  # the killed run's lock file is gone


def test_resume_refuses_a_changed_shard(data_dir, tmp_path, capsys):
    from conftest import job_text

    data = copy_tree(data_dir, tmp_path / "data")
    job = tmp_path / "job.toml"
    job.write_text(job_text(data))
    out = tmp_path / "out"
    killed_run(job, out)
    shard = data / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])  # the shard changed since
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 2
    assert "the input shards changed" in capsys.readouterr().err
    assert list(out.glob(".rded-staging/.checkpoint/score/*.npz"))


def test_resume_refuses_another_version(every_stage, tmp_path, monkeypatch, capsys):
    import rded.distill

    job, _ = every_stage
    out = tmp_path / "out"
    killed_run(job, out)
    monkeypatch.setattr(rded.distill, "__version__", "9.9.9")
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 2
    assert 'versions.rded ("0.1.0", now "9.9.9")' in capsys.readouterr().err


def test_resume_of_a_finished_run_does_nothing_and_of_nothing_runs_the_job(every_stage, tmp_path, capsys):
    job, reference = every_stage
    finished = copy_tree(reference, tmp_path / "finished")
    stamp = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    assert main(["distill", str(job), "--out", str(finished), "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == stamp
    assert main(["distill", str(job), "--out", str(tmp_path / "new"), "--resume"]) == 0
    assert run_files(tmp_path / "new") == run_files(reference)
    assert json.loads((tmp_path / "new" / "report.json").read_text())["checkpoint"]["resumed"] is False
    assert main(["distill", str(job), "--out", str(tmp_path / "x"), "--resume", "--overwrite"]) == 2


def test_a_plain_rerun_starts_afresh_and_says_so(every_stage, tmp_path):
    job, reference = every_stage
    out = tmp_path / "out"
    killed_run(job, out)
    proc = rded("distill", str(job), "--out", str(out))
    assert proc.returncode == 0 and "discarded (--resume continues it)" in proc.stderr
    assert run_files(out) == run_files(reference)


# -- torchrun


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_restarts_a_killed_rank_and_resumes(baseline_run, write_job, tmp_path):
    """Two ranks with --max-restarts 1; rank 1 is SIGKILLed after its first scored shard; the agent restarts
    the workers, they resume, and the run is the single-process one, byte for byte."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RDED_TEST_KILL": "event:2", "RDED_TEST_KILL_RANK": "1",
           "RDED_TEST_KILL_ONCE": str(tmp_path / "killed-once"),
           # torch's agent shares its TCP store with the workers by default, and a restarted worker can then
           # read a dead peer's address (pytorch/pytorch#135712): restarts need the store unshared
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "rded",
                           "distill", str(write_job()), "--out", str(out), "--resume"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "killed-once").exists()  # the kill happened
    assert run_files(out) == run_files(baseline_run)
    report = json.loads((out / "report.json").read_text())["checkpoint"]
    assert report["resumed"] is True and report["units_reused"].get("score_shards", 0) >= 1


def test_two_nodes_on_one_machine_give_the_single_process_run(baseline_run, write_job, tmp_path):
    """Two torchrun launches, one per "node", meeting at a c10d rendezvous on 127.0.0.1 (gloo)."""
    out, port, job = tmp_path / "out", free_port(), write_job()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "--rdzv-id", "two-nodes", "-m", "rded", "distill", str(job), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    assert run_files(out) == run_files(baseline_run)
    assert json.loads((out / "report.json").read_text())["ranks"] == 2
    shutil.rmtree(out)


def test_ledger_parts_assemble_in_canonical_order_in_bounded_chunks(tmp_path, monkeypatch):
    """Brute force: rows recorded in any order, across parts and sorted in chunks of 3, come out sorted by
    (shard position, offset, row), with the accounting of the whole."""
    import random

    import rded.report as report

    monkeypatch.setattr(report, "SORT_CHUNK", 3)
    rows = [(f"k{i:02d}", i % 3, f"s{i % 3}", random.Random(i).randrange(-1, 50),
             ["not_drawn", "skipped", "scored", "distilled"][i % 4]) for i in range(40)]
    shuffled = random.Random(0).sample(rows, len(rows))
    parts = []
    for n, chunk in enumerate((shuffled[:17], shuffled[17:30], shuffled[30:])):
        ledger = report.Ledger(tmp_path / f"part{n}.tsv")
        for key, position, shard, offset, status in chunk:
            ledger.record(key, shard, status, "undecodable" if status == "skipped" else "", offset, position)
        ledger.close()
        parts.append(ledger.path)
    accounting = report.assemble_ledger(parts, tmp_path / "samples.tsv")
    lines = (tmp_path / "samples.tsv").read_text().splitlines()
    expected = sorted(rows, key=lambda r: (r[1], r[3] + 1, r[0]))
    assert lines[0] == "key\tshard\tstatus\treason\toffset"
    assert [line.split("\t")[0] for line in lines[1:]] == [r[0] for r in expected]
    assert accounting["input_samples"] == 40 and accounting["skipped"] == {"undecodable": 10}
    assert not list(tmp_path.glob(".ledger-*"))
