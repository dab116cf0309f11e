"""The training examples in examples/ run for real on a finished run, for an epoch or two."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plain_torch_example_trains_on_the_stored_labels(baseline_run):
    losses = load("train_soft_labels").train(str(baseline_run), epochs=2, batch_size=4, temperature=4.0, lr=1e-2,
                                              workers=0)
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)


def test_the_plain_torch_example_runs_from_the_command_line(baseline_run):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_soft_labels.py"), str(baseline_run), "--epochs", "1",
                           "--batch-size", "4", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 1/1: loss" in proc.stdout


def test_the_timm_example_trains_a_timm_model(baseline_run):
    pytest.importorskip("timm")
    losses = load("train_timm").train(str(baseline_run), "resnet10t", epochs=1, batch_size=4, temperature=4.0,
                                      lr=1e-3, workers=0)
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
