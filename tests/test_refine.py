"""The refine stage (FADRM): tiers exact, byte-identical reruns, the per-stage record, exact micro-batches,
the loss falling, and bad settings refused before any work."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from rded.cli import main
from rded.config import RefineConfig, load_job
from rded.distill import run_distill
from rded.normalization import IMAGENET
from rded.observer import Observer
from rded.refine import Refiner, Step, draw_step
from rded.rundir import read_manifest, slice_run
from rded.runtime import ComputePolicy
from rded.synthetic import SmallCNN

REFINE = {"enabled": True, "iterations": 6, "resolutions": [32, 32, 32], "jitter": 4, "lr": 0.1}


@pytest.fixture
def refine_job(write_job, data_dir):
    def make(name="job.toml", refine=None, **sections):
        return write_job(name, observer={"kind": "small-cnn", "weights": str(data_dir / "observer-state.pt")},
                         refine={**REFINE, **(refine or {})}, **sections)
    return make


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def run_files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".tar" or p.name == "manifest.json"}


def test_tiers_exact_after_refinement(refine_job, tmp_path):
    """An IPC 2 run sliced to IPC 1 equals an IPC 1 run: image j is refined with the images j only."""
    big = run_distill(load_job(refine_job("big.toml")), tmp_path / "ipc2")
    small = run_distill(load_job(refine_job("small.toml", distill={"ipc": 1, "slices": [1]})), tmp_path / "ipc1")
    assert big.images == 6 and small.images == 3
    slice_run(tmp_path / "ipc2", 1, tmp_path / "sliced")
    sliced, direct = run_files(tmp_path / "sliced"), run_files(tmp_path / "ipc1")
    shards = [n for n in direct if n.endswith(".tar")]
    assert shards and all(sliced[n] == direct[n] for n in shards)
    # and refinement changed the images: the unrefined run's first shard differs
    run_distill(load_job(refine_job("plain.toml", refine={"enabled": False}, distill={"ipc": 1, "slices": [1]})),
                tmp_path / "plain")
    assert members(tmp_path / "plain" / "distilled-000000.tar") != members(tmp_path / "ipc1" / "distilled-000000.tar")
    assert read_manifest(tmp_path / "sliced").refine["batches"] == read_manifest(tmp_path / "ipc1").refine["batches"]


def test_cpu_reruns_are_byte_identical_and_recorded(refine_job, tmp_path):
    job = load_job(refine_job())
    run_distill(job, tmp_path / "a")
    run_distill(job, tmp_path / "b")
    a, b = run_files(tmp_path / "a"), run_files(tmp_path / "b")
    assert a == b and len(a) == 5  # two image shards, two label shards, the manifest
    manifest = read_manifest(tmp_path / "a")
    assert manifest.job["refine"]["iterations"] == 6
    assert manifest.refine["observers"] == ["small-cnn (observer-state.pt)"]
    assert [b["image_index"] for b in manifest.refine["batches"]] == [0, 1]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["refine"]["seconds_per_image"] > 0 and report["stages"]["refine"]["images"] == 6
    meta = json.loads(members(tmp_path / "a" / "distilled-000000.tar")["00000_0000.json"])
    assert meta["refine"]["stages"] == manifest.refine["batches"][0]["stages"]


def test_unrefined_runs_record_no_refinement(baseline_run):
    manifest = read_manifest(baseline_run)
    assert manifest.refine is None and "refine" not in manifest.job
    assert "refine" not in json.loads((baseline_run / "report.json").read_text())


def test_merges_happen_exactly_at_stage_boundaries(refine_job, tmp_path):
    """The stored record: stages partition the iterations; after every stage but the last the image is
    pulled back to the original by exactly (1 - merge): the next stage starts at merge x the drift."""
    merge = 0.3
    run_distill(load_job(refine_job(refine={"iterations": 9, "merge": merge})), tmp_path / "o")
    for batch in read_manifest(tmp_path / "o").refine["batches"]:
        stages = batch["stages"]
        assert [s["iterations"] for s in stages] == [[0, 3], [3, 6], [6, 9]]
        assert [s["merged_after"] for s in stages] == [True, True, False]
        assert stages[0]["drift_start"] == 0.0
        for prev, nxt in zip(stages, stages[1:]):
            assert prev["drift_end"] > 0
            assert nxt["drift_start"] == pytest.approx(merge * prev["drift_end"], rel=1e-4)


def small_observer(num_classes=3, seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, width=8).eval()
    with torch.no_grad():  # BN running statistics unlike a fresh layer's, so the BN terms matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return Observer(model, IMAGENET, torch.arange(num_classes), ComputePolicy(torch.device("cpu")))


def test_micro_batches_give_the_whole_batch_gradient():
    """Brute force: the two-pass micro-batched gradient equals the one-pass gradient of the whole batch."""
    obs = small_observer()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    z0 = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225
    labels = torch.tensor([0, 1, 2, 0, 1])
    step = draw_step(0, 0, 0, 32, 4)
    grads, losses = [], []
    for micro in (5, 2):
        refiner = Refiner(RefineConfig(enabled=True, iterations=1, resolutions=[32], micro_batch=micro), [obs],
                          ["small"], seed=0, resolution=32)
        z = z0.clone().requires_grad_(True)
        with refiner._hooked():
            losses.append(refiner.loss_and_grad(z, labels, step, 32, 0))
        grads.append(z.grad)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0][2] > 0  # the BN terms took part
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_loss_falls_on_a_small_case():
    """The objective (CE + BN terms), evaluated on whole images with no augmentation, is clearly lower on the
    refined images than on the originals; the stored record shows the fall too."""
    obs = small_observer()
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    labels = torch.tensor([0, 1, 2])
    cfg = RefineConfig(enabled=True, iterations=40, resolutions=[32, 32], merge=1.0, jitter=2)
    refiner = Refiner(cfg, [obs], ["small"], seed=0, resolution=32)
    refined, record = refiner.refine(images, labels.tolist(), 0)
    whole = Step((0, 0, 32, 32), False, (0, 0))

    def objective(x: np.ndarray) -> float:
        z = IMAGENET(torch.from_numpy(x).permute(0, 3, 1, 2)).requires_grad_(True)
        with refiner._hooked():
            return refiner.loss_and_grad(z, labels, whole, 32, 0)[0]
    assert refined.shape == images.shape and refined.dtype == np.uint8
    assert objective(refined) < 0.95 * objective(images)
    assert record.stages[-1].loss_end < record.stages[0].loss_start


def test_several_observers_in_turn(refine_job, data_dir, tmp_path):
    spec = {"kind": "small-cnn", "weights": str(data_dir / "observer-state.pt")}
    run_distill(load_job(refine_job(refine={"observers": [spec, spec]})), tmp_path / "o")
    assert read_manifest(tmp_path / "o").refine["observers"] == ["small-cnn (observer-state.pt)"] * 2


@pytest.mark.parametrize("refine,needle", [
    ({"iterationz": 3}, "refine.iterationz: unknown key"),
    ({"iterations": 7}, "must split evenly across the 3 resolutions"),
    ({"lr": 0}, "refine.lr"),
    ({"merge": 1.5}, "refine.merge"),
    ({"resolutions": [8]}, "refine.resolutions"),
    ({"jitter": -1}, "refine.jitter"),
    ({"observers": [{"kind": "nope"}]}, "refine.observers[0].kind: unknown observer 'nope'"),
    ({"observers": [{"kind": "small-cnn", "weights": "/nonexistent.pt"}]}, "refine.observers[0].weights: file not found"),
])
def test_bad_refine_keys_exit_2_naming_the_key(refine_job, tmp_path, capsys, refine, needle):
    rc = main(["distill", str(refine_job(refine=refine)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_bn_less_observer_is_refused_unless_bn_weight_is_0(write_job, tmp_path, capsys):
    """The TorchScript observer's layers cannot be hooked: refused before any data is read."""
    rc = main(["distill", str(write_job(refine=REFINE)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no BatchNorm layers" in err and "refine.bn_weight = 0" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert main(["distill", str(write_job("nobn.toml", refine={**REFINE, "bn_weight": 0})),
                 "--out", str(tmp_path / "o")]) == 0


def test_two_ranks_refine_as_one_process(refine_job, tmp_path):
    """Under torchrun each rank refines its batches (j mod 2) and writes its shards from the shared spool."""
    from test_distributed import torchrun

    job = refine_job()
    run_distill(load_job(job), tmp_path / "one")
    proc = torchrun("distill", str(job), "--out", str(tmp_path / "two"))
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert run_files(tmp_path / "two") == run_files(tmp_path / "one")
    assert not list((tmp_path / "two").glob(".*"))  # the spool went with the staging folder
