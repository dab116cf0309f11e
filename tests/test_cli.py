"""Bad jobs fail before any work: one message naming the problem, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rded.cli import main


def run_rded(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rded", *args], capture_output=True, text=True, timeout=300)


def test_unknown_key_via_the_real_command(write_job, tmp_path):
    job = write_job(distill={"ipcc": 3})
    proc = run_rded("distill", str(job), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "distill.ipcc: unknown key" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing started


@pytest.mark.parametrize("sections,needle", [
    ({"distill": {"ipc": "ten"}}, "distill.ipc"),
    ({"distill": {"ipc": 0}}, "distill.ipc"),
    ({"distill": {"score_mode": "padded"}}, "distill.score_mode"),
    ({"distill": {"slices": [1, 5]}}, "slices must"),
    ({"data": {"train": "/nonexistent/train-{000..001}.tar"}}, "shard not found: /nonexistent/train-000.tar"),
    ({"data": {"classes": "/nonexistent/classes.json"}}, "data.classes: file not found"),
    ({"observer": {"weights": "/nonexistent/observer.pt"}}, "observer.weights: file not found"),
    ({"observer": {"kind": "torchvision"}}, "needs observer.arch"),
    ({"observer": {"kind": "torchvision", "arch": "resnet9000"}}, "observer.arch"),
    ({"observer": {"class_map": "imagenet_index"}}, "no imagenet_index"),
    ({"runtime": {"device": "gpu"}}, "runtime.device"),
    ({"data": {"class_subset": [0, 7]}}, "data.class_subset: no such classes [7]"),
])
def test_bad_jobs_exit_2_naming_the_problem(write_job, tmp_path, capsys, sections, needle):
    rc = main(["distill", str(write_job(**sections)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_file_bad_toml_and_bad_override(tmp_path, write_job, capsys):
    assert main(["distill", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "job file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[data\ntrain = 3")
    assert main(["distill", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    no_observer = tmp_path / "no_observer.toml"
    no_observer.write_text('[data]\ntrain = "x.tar"\n')
    assert main(["distill", str(no_observer), "--out", str(tmp_path / "o")]) == 2
    assert "observer: required key is missing" in capsys.readouterr().err
    assert main(["distill", str(write_job()), "--out", str(tmp_path / "o"), "--set", "ipc=3"]) == 2
    assert "expected section.key=value" in capsys.readouterr().err
    assert main(["distill", str(write_job()), "--out", str(tmp_path / "o"), "--set", "distill.crops=0"]) == 2
    assert "distill.crops" in capsys.readouterr().err


def test_overrides_are_typed(write_job):
    from rded.config import load_job

    job = load_job(write_job(), ["distill.ipc=5", "distill.slices=[1, 5]", "distill.score_mode=native"])
    assert job.distill.ipc == 5 and job.distill.tiers == [1, 5] and job.distill.score_mode == "native"


def test_slice_of_a_non_run_is_exit_2(tmp_path, capsys):
    assert main(["slice", str(tmp_path), "--ipc", "1", "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_sigterm_mid_run_leaves_nothing_finished_looking_and_resume_completes(write_job, tmp_path):
    import signal
    import time

    # many views make the relabel stage long enough to be interrupted in the middle
    job = write_job(relabel={"views": 3000})
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "rded", "distill", str(job), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob(".rded-staging/distilled-*.tar")) and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert [p.name for p in out.iterdir()] == [".rded-staging"]  # hidden, and kept for --resume
    assert "--resume" in proc.stderr.read()
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    assert (out / "manifest.json").is_file() and not (out / ".rded-staging").exists()
    assert json.loads((out / "report.json").read_text())["checkpoint"]["units_reused"]["score_shards"] == 2


@pytest.mark.parametrize("blocked", ["pydantic", "webdataset"])
def test_without_the_job_extra_the_command_says_what_to_install(blocked, tmp_path):
    """A reader-only install (`pip install rded`) lacks the job's packages: one line and exit 2, no traceback.
    (The package is blocked from importing in a real interpreter.)"""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from rded.cli import main\n"
            f"sys.exit(main(['distill', 'job.toml', '--out', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"rded: error: the job's packages are not installed ({blocked} missing): "
                                   "pip install \"rded[job]\" (the reader alone, rded.numpy_reader and "
                                   "rded.DistilledDataset, needs none of them)")
