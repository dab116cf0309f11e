"""No silent CPU fallback on a GPU node: `runtime.device = "auto"` runs on the CPU only where no GPU is in
sight. A machine that was given GPUs (NVIDIA_VISIBLE_DEVICES, /dev/nvidiaN) but where torch cannot use CUDA
(a driver too old for the CUDA 13 wheels, a container without the driver) is a bad job, exit 2, naming what
was seen and why; `runtime.device = "cpu"` still runs there. Tested without a GPU: the signs of one are an
environment variable and a folder of device files, and torch's CUDA is made unavailable where it is not
already."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rded import runtime
from rded.cli import main
from rded.errors import JobError
from rded.runtime import resolve_devices


@pytest.fixture
def no_cuda(monkeypatch):
    """torch's CUDA unusable, as on a node whose driver is too old (a no-op on a CPU machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def dev_with_gpus(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null"):
        (dev / name).touch()
    return dev


def test_gpus_seen_reads_the_variable_and_the_device_files(tmp_path, dev_with_gpus):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runtime.gpus_seen({}, empty) == []
    for nothing in ("", "void", "none", "NONE", " "):
        assert runtime.gpus_seen({"NVIDIA_VISIBLE_DEVICES": nothing}, empty) == [], nothing
    assert runtime.gpus_seen({"NVIDIA_VISIBLE_DEVICES": "all"}, empty) == ["NVIDIA_VISIBLE_DEVICES=all"]
    assert runtime.gpus_seen({"NVIDIA_VISIBLE_DEVICES": "GPU-0c1d"}, empty) == ["NVIDIA_VISIBLE_DEVICES=GPU-0c1d"]
    # the control and UVM files exist without GPUs too: only numbered devices count
    assert runtime.gpus_seen({}, dev_with_gpus) == [str(dev_with_gpus / "nvidia0"), str(dev_with_gpus / "nvidia1")]
    assert runtime.gpus_seen({}, tmp_path / "missing") == []


@pytest.mark.parametrize("signs", ["variable", "device files"])
def test_auto_on_a_gpu_node_without_cuda_is_a_job_error(no_cuda, tmp_path, dev_with_gpus, signs):
    environ, dev = ({"NVIDIA_VISIBLE_DEVICES": "all"}, tmp_path) if signs == "variable" else ({}, dev_with_gpus)
    with pytest.raises(JobError) as e:
        resolve_devices("auto", "auto", environ=environ, dev=dev)
    msg = str(e.value)
    assert "runtime.device" in msg and 'runtime.device = "cpu"' in msg and "CUDA is not usable" in msg
    assert ("NVIDIA_VISIBLE_DEVICES=all" if signs == "variable" else str(dev_with_gpus / "nvidia0")) in msg
    assert runtime.cuda_unusable_reason() in msg


def test_the_cpu_asked_for_runs_on_a_gpu_node_without_cuda(no_cuda, dev_with_gpus):
    environ = {"NVIDIA_VISIBLE_DEVICES": "all"}
    assert resolve_devices("cpu", "auto", environ=environ, dev=dev_with_gpus) == (torch.device("cpu"), "cpu")


def test_auto_without_gpus_is_the_cpu(no_cuda, tmp_path):
    assert resolve_devices("auto", "auto", environ={"NVIDIA_VISIBLE_DEVICES": "void"}, dev=tmp_path) == \
        (torch.device("cpu"), "cpu")


def test_cuda_asked_for_without_cuda_says_why(no_cuda):
    with pytest.raises(JobError, match=r"runtime.device = 'cuda' but CUDA is not usable on this machine: .+"):
        resolve_devices("cuda", "auto", environ={}, dev="/nonexistent")


def test_the_reason_names_the_driver_and_torch_cuda(tmp_path):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Thu Oct 19 18:56:32 UTC 2023\n"
                       "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    reason = runtime.cuda_unusable_reason(version)
    if torch.version.cuda is None:
        assert reason == "this torch is a CPU-only build"
    else:
        assert "535.129.03" in reason and f"CUDA {torch.version.cuda}" in reason
    assert "driver loaded" not in runtime.cuda_unusable_reason(tmp_path / "missing")


# ---- through the command ----------------------------------------------------------------------------------

@pytest.mark.parametrize("check", [False, True], ids=["run", "check"])
def test_distill_on_a_gpu_node_without_cuda_exits_2(no_cuda, monkeypatch, write_job, tmp_path, capsys, check):
    """The real command, in-process: exit 2 before any work, naming the GPUs seen and the way out. With
    --check too, which the launch files run first so that such a node fails once, not once per restart."""
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    out = tmp_path / "o"
    rc = main(["distill", str(write_job()), "--out", str(out), "--resume"] + (["--check"] if check else []))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "rded: error: runtime.device = 'auto'" in err and "NVIDIA_VISIBLE_DEVICES=all" in err
    assert "--set runtime.device=cpu" in err
    assert not out.exists()  # nothing started


def test_distill_with_device_cpu_runs_on_a_gpu_node_without_cuda(no_cuda, monkeypatch, write_job, tmp_path, capsys):
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    out = tmp_path / "o"
    rc = main(["distill", str(write_job()), "--out", str(out), "--set", "runtime.device=cpu"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "manifest.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: the variable alone cannot make it unusable")
def test_the_variable_alone_fails_a_real_process(write_job, tmp_path):
    """No patching: a process that sees NVIDIA_VISIBLE_DEVICES=all on a machine without usable CUDA."""
    job = write_job()
    env = {**os.environ, "NVIDIA_VISIBLE_DEVICES": "all"}
    proc = subprocess.run([sys.executable, "-m", "rded", "distill", str(job), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "NVIDIA_VISIBLE_DEVICES=all" in proc.stderr and "CUDA did not initialise" in proc.stderr
    assert not (tmp_path / "o").exists()
