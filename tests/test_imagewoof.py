"""The job on the real ImageWoof shards with the real EfficientNet-Lite0 observer, at reduced settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import SHARED_IMAGEWOOF, tar_members
from rded.cli import main

JOB = Path(__file__).resolve().parents[1] / "jobs" / "imagewoof.toml"

pytestmark = pytest.mark.skipif(not (SHARED_IMAGEWOOF / "train-000000.tar").is_file(), reason="no ImageWoof shards")


def test_imagewoof_job_end_to_end(tmp_path):
    small = ["distill.subset=12", "distill.crops=2", "distill.resolution=96", "distill.ipc=2",
             "relabel.views=4", "runtime.progress=false"]
    args = ["distill", str(JOB), "--out", str(tmp_path / "out")]
    for s in small:
        args += ["--set", s]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [c["images"] for c in manifest["classes"]] == [2] * 10
    assert [c["name"] for c in manifest["classes"]][:2] == ["Shih-Tzu", "Rhodesian ridgeback"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accounting"]["input_samples"] == 4115 and report["accounting"]["skipped"] == {}
    assert report["accounting"]["distilled"] == 10 * 2 * 4
    # the picked patches are ones a real, class-mapped dog classifier is sure of: far above chance (1/10)
    scores = [cell["score"] for shard in (tmp_path / "out").glob("distilled-*.tar")
              for name, data in tar_members(shard).items() if name.endswith(".json")
              for cell in json.loads(data)["cells"]]
    assert len(scores) == 80 and sum(scores) / len(scores) > math.log(0.5)
    assert manifest["labels"]["mean_kl_t20"] < 1e-3
