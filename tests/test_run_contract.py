"""The run contract under a cluster's faults: one owner per output directory, publish-then-clean (a kill or a
failure anywhere in finishing leaves the complete staged run or the complete published one), resumes that
answer the right question, output I/O errors as one line with exit 74, and `rded distill --check`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import job_text
from rded.cli import main
from rded.config import load_job
from rded.distill import run_distill

PUBLISH_STEPS = 18  # publish_step() calls in finishing this job: checked below, so a new step is not missed


def run_files(out: Path, visible: bool = False) -> dict[str, bytes]:
    """What a finished run publishes, but report.json (its timings differ by design); `visible`: only the
    files that are not hidden (not the staging folder nor a lock file left by a kill)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name != "report.json" and not (visible and p.name.startswith("."))}


def rded(*args: str, env: dict[str, str] | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "rded", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full_env)


@pytest.fixture(scope="module")
def contract(tmp_path_factory, data_dir):
    """A job (with a refined stage, so every kind of scratch folder exists) and its uninterrupted run."""
    tmp = tmp_path_factory.mktemp("contract")
    job = tmp / "job.toml"
    job.write_text(job_text(data_dir, observer={"kind": "small-cnn", "weights": str(data_dir / "observer-state.pt")},
                            refine={"enabled": True, "iterations": 2, "resolutions": [32], "jitter": 2}))
    run_distill(load_job(job), tmp / "reference")
    return job, tmp / "reference"


def stopped_at(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the process stopped itself (RDED_TEST_KILL_SIGNAL=STOP)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0]
        if state == "T":
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError("the run did not reach its stop point")


# -- one owner per output


def test_a_second_process_on_the_same_output_is_refused_naming_the_holder(contract, tmp_path, capsys):
    job, reference = contract
    out = tmp_path / "out"
    first = rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:2", "RDED_TEST_KILL_SIGNAL": "STOP"},
                 wait=False)
    try:
        stopped_at(first)
        # another seed: before the lock, the second process published a mix of both runs with exit 0
        assert main(["distill", str(job), "--out", str(out), "--set", "distill.seed=1"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another rded process (pid {first.pid}" in err
        # the check only notes it: the holder may be this run's own rank 0, which torchrun is about to restart
        assert main(["distill", str(job), "--out", str(out), "--resume", "--check"]) == 0
        assert f"in use by another rded process now (pid {first.pid}" in capsys.readouterr().err
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert run_files(out) == run_files(reference)


# -- publish, then clean


def test_every_point_of_finishing_is_counted(contract, tmp_path):
    """The kill test below covers each publish step: this job's finishing has PUBLISH_STEPS of them."""
    job, _ = contract
    proc = rded("distill", str(job), "--out", str(tmp_path / "out"), env={"RDED_TEST_KILL": f"publish:{PUBLISH_STEPS}"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = rded("distill", str(job), "--out", str(tmp_path / "again"),
                env={"RDED_TEST_KILL": f"publish:{PUBLISH_STEPS + 1}"})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("point", range(1, PUBLISH_STEPS + 1))
def test_a_kill_anywhere_in_finishing_loses_nothing_and_publishes_nothing_partial(contract, tmp_path, point, capsys):
    job, reference = contract
    out = tmp_path / "out"
    signal_name = "TERM" if point % 4 == 2 else "KILL"  # SIGTERM runs the cleanup path, SIGKILL none
    killed = rded("distill", str(job), "--out", str(out),
                  env={"RDED_TEST_KILL": f"publish:{point}", "RDED_TEST_KILL_SIGNAL": signal_name})
    assert killed.returncode == (143 if signal_name == "TERM" else -9), killed.stderr[-2000:]
    staged_whole = (out / ".rded-staging" / "manifest.json").exists()
    if (out / "manifest.json").exists():  # published: complete, whatever cleaning (and the lock file) was left
        assert {n: b for n, b in run_files(out, visible=True).items()} == run_files(reference)
    else:  # not published: the staged run is whole and nothing in DIR looks finished
        assert (out / ".rded-staging").is_dir()
    capsys.readouterr()
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert run_files(out) == run_files(reference)
    assert not (out / ".rded-staging").exists()
    if staged_whole:  # the next start only finished publishing: no index pass, nothing computed
        assert "finished publishing the run that was staged" in err and "indexed" not in err
    else:  # it resumed the staged units: nothing committed was lost
        report = json.loads((out / "report.json").read_text())["checkpoint"]
        assert report["resumed"] and report["units_computed"].get("score_shards", 0) == 0


def test_leftover_ledger_scratch_is_never_published(contract, tmp_path):
    job, reference = contract
    out = tmp_path / "out"
    assert rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:5"}).returncode == -9
    leftover = out / ".rded-staging" / ".ledger-x1y2"  # what a kill inside the ledger's external sort leaves
    leftover.mkdir()
    (leftover / "0.tsv").write_text("0\t1\tkey\tshard\tscored\t\t0\n")
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    assert run_files(out) == run_files(reference)
    assert not list(out.glob(".*"))  # no scratch, no staging, no lock file


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


def test_a_read_only_target_at_publish_is_exit_74_and_loses_nothing(contract, tmp_path):
    """The output directory turns read-only while the run is about to publish (a read-only bind mount over
    it, made while the run is paused: path lookups from then on see a read-only file system)."""
    job, reference = contract
    out = tmp_path / "out"
    proc = rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "publish:2",
                                                              "RDED_TEST_KILL_SIGNAL": "STOP"}, wait=False)
    stopped_at(proc)
    bind = subprocess.run(["mount", "--bind", str(out), str(out)], capture_output=True, text=True)
    if bind.returncode != 0:
        os.kill(proc.pid, signal.SIGKILL)
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(out)], check=True)
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        subprocess.run(["umount", str(out)])
    assert proc.returncode == 74, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("rded: error: ") and "Read-only file system" in last and "--resume" in last
    assert "Traceback" not in stderr
    assert not (out / "manifest.json").exists() and (out / ".rded-staging").is_dir()
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    assert run_files(out) == run_files(reference)
    report = json.loads((out / "report.json").read_text())["checkpoint"]
    assert report["resumed"] and report["units_computed"].get("score_shards", 0) == 0


def test_a_full_disk_is_exit_74_and_resumes_when_there_is_room(contract, tmp_path):
    job, reference = contract
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "24k")
    try:
        out = disk / "out"
        proc = rded("distill", str(job), "--out", str(out))
        assert proc.returncode == 74, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "No space left on device" in last and "--resume" in last and "Traceback" not in proc.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
        assert run_files(out) == run_files(reference)
    finally:
        subprocess.run(["umount", str(disk)])


# -- resume that answers the right question


def test_resume_of_a_finished_run_refuses_a_changed_result_key(contract, tmp_path, capsys):
    job, reference = contract
    out = tmp_path / "out"
    assert main(["distill", str(job), "--out", str(out)]) == 0
    capsys.readouterr()
    before = run_files(out)
    assert main(["distill", str(job), "--out", str(out), "--resume", "--set", "distill.seed=7",
                 "--set", "distill.crops=2"]) == 2
    err = capsys.readouterr().err
    assert "finished run that differs from this job in distill.crops (3, now 2); distill.seed (0, now 7)" in err
    assert run_files(out) == before
    # what does not change the output may change
    assert main(["distill", str(job), "--out", str(out), "--resume", "--set", "runtime.batch_size=3"]) == 0
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_of_an_unfinished_run_refuses_a_changed_result_key_and_takes_a_changed_batch_size(contract, tmp_path,
                                                                                                    capsys):
    job, reference = contract
    out = tmp_path / "out"
    assert rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:3"}).returncode == -9
    assert main(["distill", str(job), "--out", str(out), "--resume", "--set", "relabel.views=4"]) == 2
    assert "it differs in relabel.views (3, now 4)" in capsys.readouterr().err
    assert main(["distill", str(job), "--out", str(out), "--resume", "--set", "runtime.batch_size=3",
                 "--set", "runtime.dali_threads=2", "--set", "runtime.max_batch_pixels=50000000"]) == 0
    assert run_files(out) == run_files(reference)


def test_a_killed_overwrite_resumes_the_new_run_not_the_old_manifest(contract, tmp_path, capsys):
    job, _ = contract
    out, seed1 = tmp_path / "out", tmp_path / "seed1"
    assert main(["distill", str(job), "--out", str(out)]) == 0
    assert main(["distill", str(job), "--out", str(seed1), "--set", "distill.seed=1"]) == 0
    killed = rded("distill", str(job), "--out", str(out), "--overwrite", "--set", "distill.seed=1",
                  env={"RDED_TEST_KILL": "event:4"})
    assert killed.returncode == -9
    capsys.readouterr()
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 2  # the old job: the new run differs
    assert "distill.seed (1, now 0)" in capsys.readouterr().err
    assert main(["distill", str(job), "--out", str(out), "--resume", "--set", "distill.seed=1"]) == 0
    assert run_files(out) == run_files(seed1)


def test_resume_refuses_a_run_that_resolved_another_precision(contract, tmp_path, capsys):
    """A requeue onto a node where `auto` resolves otherwise must not mix precisions in one run."""
    job, _ = contract
    out = tmp_path / "out"
    assert rded("distill", str(job), "--out", str(out), "--set", "runtime.precision=fp32",
                env={"RDED_TEST_KILL": "event:3"}).returncode == -9
    assert main(["distill", str(job), "--out", str(out), "--resume", "--set", "runtime.precision=bf16"]) == 2
    err = capsys.readouterr().err
    assert "resolved.precision (\"fp32\", now \"bf16\")" in err and "runtime.precision" in err


# -- --check


def test_check_says_what_a_start_would_do_and_writes_nothing(contract, tmp_path, capsys):
    job, _ = contract
    out = tmp_path / "out"
    assert main(["distill", str(job), "--out", str(out), "--resume", "--check"]) == 0
    assert "the run would start" in capsys.readouterr().out and not out.exists()
    assert rded("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:3"}).returncode == -9
    staged = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert main(["distill", str(job), "--out", str(out), "--resume", "--check"]) == 0
    assert "the unfinished run would continue" in capsys.readouterr().out
    assert main(["distill", str(job), "--out", str(out), "--resume", "--check", "--set", "distill.seed=3"]) == 2
    assert "distill.seed (0, now 3)" in capsys.readouterr().err
    assert main(["distill", str(job), "--out", str(out), "--check"]) == 0  # would start afresh
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == staged
    bad = tmp_path / "bad.toml"
    bad.write_text(job.read_text().replace("crops = 3", "crops = 0"))
    assert main(["distill", str(bad), "--out", str(out), "--resume", "--check"]) == 2


# -- durability


def test_every_rename_in_the_run_directory_is_followed_by_a_sync_of_its_directory(contract, tmp_path, monkeypatch):
    """A rename survives a power loss only once its directory is synced: every rename into the run's folders
    (units, spools, shards, the manifest) is followed by an fsync of that directory, and every file renamed
    into place was synced before (by inode). The real calls run; they are only recorded."""
    job, reference = contract
    out = tmp_path / "out"
    events: list[tuple[str, str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_ino))

    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        events.append(("rename", str(dst), os.stat(dst).st_ino))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run_distill(load_job(job), out)
    assert run_files(out) == run_files(reference)
    renames = [(i, dst, ino) for i, (kind, dst, ino) in enumerate(events) if kind == "rename" and dst.startswith(str(out))]
    assert len(renames) > 10
    for i, dst, ino in renames:
        synced_dirs_after = {path for kind, path, _ in events[i + 1:] if kind == "fsync"}
        assert str(Path(dst).parent) in synced_dirs_after, f"{dst}: its directory was never synced after the rename"
        if not Path(dst).is_dir():
            assert ino in {n for kind, _, n in events[:i] if kind == "fsync"}, f"{dst} was renamed into place unsynced"
