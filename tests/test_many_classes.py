"""Classes = an observer's 1,000 outputs: labels written as ImageNet indices, no classes.json, most classes
without a sample. The job must run, report the empty classes, keep tiers, slices, the contact sheet and
the soft labels working."""

from __future__ import annotations

import csv
import json

import torch
from PIL import Image

from rded.cli import main
from rded.config import load_job
from rded.distill import run_distill
from rded.loader import DistilledDataset
from rded.synthetic import SmallCNN, remap_labels, save_torchscript, write_synthetic_shards

from conftest import job_text, sample_keys

# data-set class -> ImageNet-style index; 8 is the synthetic "unknown_class" label, sent past 1,000
MAPPING = {0: 7, 1: 500, 2: 999, 8: 1005}
PER_CLASS = 12


def test_thousand_observer_classes_with_data_for_three(tmp_path):
    local = tmp_path / "local"
    write_synthetic_shards(local, num_classes=3, per_class=PER_CLASS, num_shards=2, seed=3, size_range=(40, 64),
                           bad_samples={"unknown_class": 1})
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        remap_labels(local / f"train-{i:06d}.tar", data / f"train-{i:06d}.tar", MAPPING)
    torch.manual_seed(0)
    save_torchscript(SmallCNN(1000, width=8).eval(), data / "observer.pt")
    job = tmp_path / "job.toml"
    text = job_text(data, distill={"ipc": 2, "slices": [1, 2], "subset": 8, "crops": 2})
    job.write_text(text.replace(f'classes = "{data / "classes.json"}"\n', ""))
    assert "classes =" not in job.read_text()

    summary = run_distill(load_job(job), tmp_path / "out")
    assert "6 distilled images (3 of 1000 classes" in summary.line()
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())

    with_images = {c["index"]: c["images"] for c in manifest["classes"] if c["images"]}
    assert with_images == {7: 2, 500: 2, 999: 2}
    assert len(manifest["classes"]) == 1000
    assert report["empty_classes"]["count"] == 997 and "8" in report["empty_classes"]["classes"]
    assert report["short_classes"] == {}
    assert report["accounting"]["skipped"] == {"unknown_class": 1}  # label 1005: past the observer's outputs
    rows = list(csv.DictReader(open(out / "samples.tsv", encoding="utf-8"), delimiter="\t"))
    assert len(rows) == sum(len(sample_keys(data / f"train-{i:06d}.tar")) for i in range(2))

    # the contact sheet has a row per class that has images (3), not rows of empty classes
    sheet = Image.open(out / "contact-sheet.png")
    assert sheet.size == (2 * 98 + 2, 3 * 98 + 2)

    # soft labels over all 1,000 outputs, view and region labels stored
    assert manifest["labels"]["classes"] == 1000 and manifest["labels"]["regions"] == 4
    ds = DistilledDataset(out, temperature=1.0)
    assert len(ds) == 6
    image, label = ds[0]
    assert label.shape == (1000,) and abs(float(label.sum()) - 1.0) < 1e-4

    assert main(["slice", str(out), "--ipc", "1", "--out", str(tmp_path / "ipc1")]) == 0
    sliced = json.loads((tmp_path / "ipc1" / "manifest.json").read_text())
    assert sliced["images"] == 3
    assert {c["index"] for c in sliced["classes"] if c["images"]} == {7, 500, 999}


def test_imagenet_shaped_set_has_the_asked_counts(tmp_path):
    from collections import Counter

    from rded.synthetic import imagenet_class_counts, write_imagenet_shaped
    from conftest import tar_members

    paths = write_imagenet_shaped(tmp_path, samples=2_003, num_shards=4, num_classes=20, pool_size=8,
                                  size_range=(32, 40))
    labels: Counter[int] = Counter()
    keys = []
    for path in paths:
        members = tar_members(path)
        keys += sample_keys(path)
        labels.update(int(v) for k, v in members.items() if k.endswith(".cls"))
    assert len(keys) == len(set(keys)) == 2_003
    assert [labels[c] for c in range(20)] == imagenet_class_counts(2_003, 20).tolist()
    assert max(len(sample_keys(p)) for p in paths) - min(len(sample_keys(p)) for p in paths) <= 1
    assert imagenet_class_counts(1_281_167, 1000).sum() == 1_281_167
