"""rded eval survives interruption: a training killed anywhere (SIGKILL) and resumed with --resume ends with the
weights, optimiser state and result of one never interrupted; checkpoints of another training are refused;
the authors' best-of subset and checks are what the protocol says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import NUM_CLASSES
from rded.evaluate import best_of_checks, best_of_subset
from rded.keyed import keyed_u64
from rded.runtime import ComputePolicy
from rded.synthetic import write_synthetic_shards
from rded.train import ValShards, build_student, evaluate

EPOCHS = 6


def rded_eval(run: Path, val_dir: Path, out: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    args = ["eval", "--distilled", str(run), "--val", str(val_dir / "val-{000000..000002}.tar"),
            "--epochs", str(EPOCHS), "--resolution", "32", "--checkpoint-every", "2", "--best-of-per-class", "3",
            "--precision", "fp32", "--workers", "0", "--quiet", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"RDED_TEST_KILL": kill} if kill else {})}
    return subprocess.run([sys.executable, "-m", "rded", *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(baseline_run, val_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "r.json"
    done = rded_eval(baseline_run, val_dir, out)
    assert done.returncode == 0, done.stderr
    return out


def final_state(out: Path) -> dict:
    return torch.load(out.with_suffix(".ckpt"), map_location="cpu", weights_only=True)


def saved_student(out: Path) -> tuple[ComputePolicy, torch.nn.Module]:
    """The student of a finished training's checkpoint, for brute-force evaluation in fp32 on the CPU."""
    compute = ComputePolicy(torch.device("cpu"), "fp32")
    model = compute.prepare(build_student("resnet18", NUM_CLASSES))
    model.load_state_dict(final_state(out)["model"])
    return compute, model


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


# epoch:2 dies after the checkpoint of epoch 4; rename:2 inside the commit of epoch 4 (resumes from epoch 2);
# epoch:3 after the last checkpoint, before the final evaluation
@pytest.mark.parametrize("kill", ["epoch:2", "rename:2", "epoch:3"])
def test_killed_and_resumed_training_ends_with_the_uninterrupted_weights(baseline_run, val_dir, uninterrupted,
                                                                          tmp_path, kill):
    out = tmp_path / "r.json"
    assert rded_eval(baseline_run, val_dir, out, kill=kill).returncode == -9
    assert not out.exists() and out.with_suffix(".ckpt").is_file()
    resumed = rded_eval(baseline_run, val_dir, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    reference, got = final_state(uninterrupted), final_state(out)
    assert got["epoch"] == reference["epoch"] == EPOCHS
    for part in ("model", "optimizer", "rng"):
        assert same_tensors(got[part], reference[part]), part
    a, b = json.loads(uninterrupted.read_text()), json.loads(out.read_text())
    assert b["resumed_at_epoch"] == {"epoch:2": 4, "rename:2": 2, "epoch:3": 6}[kill]
    assert {k: a[k] for k in ("top1", "top5", "best_of", "val_samples")} == \
           {k: b[k] for k in ("top1", "top5", "best_of", "val_samples")}


def test_a_finished_training_resumed_only_evaluates_again(baseline_run, val_dir, uninterrupted, tmp_path):
    out = tmp_path / "r.json"
    out.with_suffix(".ckpt").write_bytes(uninterrupted.with_suffix(".ckpt").read_bytes())
    again = rded_eval(baseline_run, val_dir, out, "--resume")
    assert again.returncode == 0, again.stderr
    a, b = json.loads(uninterrupted.read_text()), json.loads(out.read_text())
    assert b["resumed_at_epoch"] == EPOCHS and (a["top1"], a["best_of"]) == (b["top1"], b["best_of"])


def test_a_finished_training_is_validated_again_on_other_shards_of_the_same_names(baseline_run, val_dir,
                                                                                   uninterrupted, tmp_path):
    # the same keys and shard names, other pixels (as the same photos at another resolution): the final figure
    # is the saved student's on the new shards, the best-of checks stay those of its training
    other = tmp_path / "val320"
    write_synthetic_shards(other, num_classes=NUM_CLASSES, per_class=7, num_shards=3, seed=6, size_range=(80, 100),
                           prefix="val")
    out = tmp_path / "r.json"
    out.with_suffix(".ckpt").write_bytes(uninterrupted.with_suffix(".ckpt").read_bytes())
    again = rded_eval(baseline_run, other, out, "--resume")
    assert again.returncode == 0, again.stderr
    a, b = json.loads(uninterrupted.read_text()), json.loads(out.read_text())
    urls = [str(other / f"val-{i:06d}.tar") for i in range(3)]
    assert a["val"] == [str(val_dir / f"val-{i:06d}.tar") for i in range(3)] and b["val"] == urls
    assert b["best_of"] == a["best_of"]
    compute, model = saved_student(uninterrupted)
    accuracy = evaluate(model, ValShards(urls, NUM_CLASSES, 32), compute=compute)
    assert b["val_samples"] == accuracy.count == 7 * NUM_CLASSES and b["top1"] == round(accuracy.top1, 4)


def test_best_of_reports_the_checks_of_the_protocol(baseline_run, val_dir, uninterrupted):
    result = json.loads(uninterrupted.read_text())
    best = result["best_of"]
    assert best["per_class"] == 3 and len(best["keys"]) == 3 * NUM_CLASSES
    assert [int(e) for e in best["checks"]] == best_of_checks(EPOCHS) == [EPOCHS]
    assert best["top1"] == max(best["checks"].values())
    # the last check is the final student on the subset, recomputed from the saved weights
    urls = [str(val_dir / f"val-{i:06d}.tar") for i in range(3)]
    compute, model = saved_student(uninterrupted)
    subset = evaluate(model, ValShards(urls, NUM_CLASSES, 32, keys=best["keys"]), compute=compute)
    assert subset.count == len(best["keys"]) and round(subset.top1, 4) == best["checks"][str(EPOCHS)]


def test_best_of_subset_is_seeded_per_class_and_free_of_shard_order(val_dir):
    import webdataset as wds

    urls = [str(val_dir / f"val-{i:06d}.tar") for i in range(3)]
    subset = best_of_subset(urls, NUM_CLASSES, 3, seed=0)
    assert subset == best_of_subset(urls[::-1], NUM_CLASSES, 3, seed=0)
    assert subset != best_of_subset(urls, NUM_CLASSES, 3, seed=1)
    by_class: dict[int, list[str]] = {}
    for s in wds.WebDataset(urls, shardshuffle=False):  # brute force: the 3 smallest keyed hashes per class
        by_class.setdefault(int(s["cls"]), []).append(s["__key__"])
    expected = sorted(k for keys in by_class.values() for k in sorted(keys, key=lambda k: keyed_u64(0, "best-of", k))[:3])
    assert subset == expected
    assert best_of_checks(300) == [250, 260, 270, 280, 290, 300] and best_of_checks(100) == [90, 100]


def test_checkpoints_of_another_training_are_refused(baseline_run, val_dir, uninterrupted, tmp_path):
    out = tmp_path / "r.json"
    ckpt = out.with_suffix(".ckpt")
    ckpt.write_bytes(uninterrupted.with_suffix(".ckpt").read_bytes())
    other = rded_eval(baseline_run, val_dir, out, "--resume", "--lr", "0.01")
    assert other.returncode == 2 and "another training (recipe differ)" in other.stderr
    exists = rded_eval(baseline_run, val_dir, out)
    assert exists.returncode == 2 and "--resume" in exists.stderr
    older = {k: v for k, v in final_state(uninterrupted).items() if k != "format"}
    torch.save({**older, "rng": older["rng"]["cpu"]}, ckpt)  # format 1: the global CPU RNG alone
    old_format = rded_eval(baseline_run, val_dir, out, "--resume")
    assert old_format.returncode == 2 and "checkpoint of format 1" in old_format.stderr
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    damaged = rded_eval(baseline_run, val_dir, out, "--resume")
    assert damaged.returncode == 2 and "cannot be read" in damaged.stderr
    no_checkpoint = subprocess.run([sys.executable, "-m", "rded", "eval", "--distilled", str(baseline_run), "--val",
                                    str(val_dir / "val-000000.tar"), "--resume", "--quiet"],
                                   capture_output=True, text=True, timeout=600)
    assert no_checkpoint.returncode == 2 and "--checkpoint or --out" in no_checkpoint.stderr


def test_a_student_with_dropout_resumes_bit_for_bit_with_loader_workers(baseline_run, val_dir, tmp_path):
    """Dropout draws from the global RNG on every training step; loader workers start once (persistent), so a
    resumed training starts them at another epoch: the loader must not draw from that RNG, or the resumed
    dropout masks differ from the uninterrupted training's."""
    student = ("--student", "mobilenet_v3_small", "--workers", "2")
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in build_student(student[1], NUM_CLASSES).modules())
    reference, out = tmp_path / "once" / "r.json", tmp_path / "killed" / "r.json"
    reference.parent.mkdir()
    out.parent.mkdir()
    done = rded_eval(baseline_run, val_dir, reference, *student)
    assert done.returncode == 0, done.stderr
    assert rded_eval(baseline_run, val_dir, out, *student, kill="epoch:1").returncode == -9
    resumed = rded_eval(baseline_run, val_dir, out, *student, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_state(reference), final_state(out)
    assert json.loads(out.read_text())["resumed_at_epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    # not the loader's generator: persistent workers draw their seeds once, when this process's first epoch starts
    # (so the resumed training draws once more); nothing the workers do uses them
    assert same_tensors(a["optimizer"], b["optimizer"]) and torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
