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
from rded.errors import RunError
from rded.rundir import read_manifest, slice_run, verify_run
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
    ({"bn_stats": "running"}, "refine.bn_stats: expected 'observer' or 'data', got \"running\""),
    ({"bn_stats": True}, "refine.bn_stats: expected 'observer' or 'data', got true"),
    ({"bn_stats_images": 0}, "refine.bn_stats_images: must be at least 1, got 0"),
    ({"bn_stats_images": "all"}, "refine.bn_stats_images: expected an integer"),
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


@pytest.mark.parametrize("bn_stats", ["observer", "data"])
def test_two_ranks_refine_as_one_process(refine_job, tmp_path, bn_stats):
    """Under torchrun each rank refines its batches (j mod 2) and writes its shards from the shared spool. With
    bn_stats = data the ranks' draws give the single-process sample, measured by rank 0 for both."""
    from test_distributed import torchrun

    # torchrun's ranks run one thread each: so does the process they are compared with (the thread count is part
    # of the byte-identity contract, docs/precision.md; the data's BN targets make refinement sensitive to it)
    job = refine_job(refine={"bn_stats": bn_stats, "bn_stats_images": 10}, runtime={"threads": 1})
    run_distill(load_job(job), tmp_path / "one")
    proc = torchrun("distill", str(job), "--out", str(tmp_path / "two"))
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert run_files(tmp_path / "two") == run_files(tmp_path / "one")
    assert ("bn_stats" in read_manifest(tmp_path / "two").refine) == (bn_stats == "data")
    assert not list((tmp_path / "two").glob(".*"))  # the spool went with the staging folder


# -- refine.bn_stats = "data": the job's own BN statistics

DATA_STATS = {"bn_stats": "data", "bn_stats_images": 10}


@pytest.fixture
def measured(monkeypatch):
    """Every DataStatistics the runs of a test measure, with the sample each was measured on."""
    import rded.distill

    found = []
    real = rded.distill.measure

    def spy(refiner, sample, *args, **kwargs):
        stats = real(refiner, sample, *args, **kwargs)
        found.append((list(sample), stats))
        return stats
    monkeypatch.setattr(rded.distill, "measure", spy)
    return found


def brute_force_sample(data_dir, seed: int, subset: int, n: int) -> list[str]:
    """The keys of the first n drawn samples in the keyed draw order, from the shards with tarfile alone: each
    class keeps the `subset` smallest (hash, key) of its samples with an image and a known label."""
    from rded.keyed import keyed_u64

    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(data_dir.glob("train-*.tar")):
        for name, data in members(shard).items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    by_class: dict[int, list[tuple[int, str]]] = {}
    for key, m in samples.items():
        if "jpg" in m and m.get("cls", b"").decode().isdigit() and int(m["cls"]) < 3:
            by_class.setdefault(int(m["cls"]), []).append((keyed_u64(seed, "draw", key), key))
    drawn = [x for ranked in by_class.values() for x in sorted(ranked)[:subset]]
    return [key for _, key in sorted(drawn)[:n]]


def brute_force_statistics(data_dir, keys: list[str], size: int) -> tuple[list[str], list, int]:
    """Per BN layer of the observer, the mean and biased variance over N, H, W of its input in float64, over
    the centre squares (cut by rded's decoder, as refinement's images are) in one plain torch forward pass."""
    from rded.crops import Cutter, CutRequest, image_size
    from rded.keyed import centre_square

    images = {}
    for shard in sorted(data_dir.glob("train-*.tar")):
        images.update({n.split(".")[0]: d for n, d in members(shard).items() if n.endswith(".jpg")})
    cutter = Cutter(1, batch_size=4, num_threads=1, decoder="cpu", device_id=None)
    requests = [CutRequest(images[k], [centre_square(0, k, 0, *image_size(images[k]))], [(size, size)])
                for k in keys if image_size(images[k])]
    pixels = np.stack([p[0] for p in cutter.cut(requests) if p is not None])
    model = SmallCNN(3, width=8)
    model.load_state_dict(torch.load(data_dir / "observer-state.pt", weights_only=True))
    model.eval()
    names, inputs = [], []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            names.append(name)
            m.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach().double()))
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1), torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    with torch.no_grad():
        model((x - mean) / std)
    stats = [(a.mean((0, 2, 3)).numpy(), a.var((0, 2, 3), unbiased=False).numpy()) for a in inputs]
    return names, stats, len(pixels)


def test_data_bn_statistics_equal_a_brute_force_computation(refine_job, data_dir, tmp_path, measured):
    """Seed 15 samples the image that does not decode: 9 of the 10 sampled are measured."""
    import hashlib

    run_distill(load_job(refine_job(refine=DATA_STATS, distill={"seed": 15})), tmp_path / "o")
    (sample, stats), = measured
    keys = brute_force_sample(data_dir, seed=15, subset=8, n=10)
    assert [r.key for r in sample] == keys and "bad_undecodable_00000" in keys
    names, expected, decodable = brute_force_statistics(data_dir, keys, size=REFINE["resolutions"][-1])
    assert stats.images == decodable == 9 and stats.sampled == 10 and stats.resolution == 32
    assert stats.layers == [names] and len(stats.stats[0]) == len(expected) == 6
    for (mean, var), (want_mean, want_var) in zip(stats.stats[0], expected):
        assert mean.dtype == var.dtype == np.float64
        np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-6)
    recorded = read_manifest(tmp_path / "o").refine["bn_stats"]
    assert recorded == {"source": "data", "images": decodable, "sampled": 10, "resolution": 32,
                        "file": "bn_stats.json", "sha256": hashlib.sha256(stats.to_bytes()).hexdigest(),
                        "observers": [{"name": "small-cnn (observer-state.pt)", "layers": names}]}
    assert read_manifest(tmp_path / "o").job["refine"]["bn_stats"] == "data"
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["refine"]["bn_stats"]["sha256"] == recorded["sha256"]
    assert report["checkpoint"]["units_computed"]["bn_stats"] == 1
    # published beside the manifest, and a slice keeps them; both verified against the recorded sha256
    assert (tmp_path / "o" / "bn_stats.json").read_bytes() == stats.to_bytes()
    slice_run(tmp_path / "o", 1, tmp_path / "sliced")
    assert (tmp_path / "sliced" / "bn_stats.json").read_bytes() == stats.to_bytes()
    verify_run(tmp_path / "sliced")
    (tmp_path / "o" / "bn_stats.json").write_bytes(stats.to_bytes().replace(b"[", b"[ ", 1))
    with pytest.raises(RunError, match="bn_stats.json: sha256"):
        verify_run(tmp_path / "o")


def test_the_sample_does_not_depend_on_batch_size_shard_order_or_streaming(refine_job, data_dir, tmp_path, measured):
    """Decode batches of 3 instead of 8, the shards listed in reverse and read as pipe: streams (the sampled
    images are spooled while scoring): the same sample, the same statistics, the same refined images."""
    run_distill(load_job(refine_job("a.toml", refine=DATA_STATS)), tmp_path / "a")
    shards = [f"pipe:cat {data_dir / f'train-{i:06d}.tar'}" for i in (1, 0)]
    run_distill(load_job(refine_job("b.toml", refine=DATA_STATS, runtime={"batch_size": 3},
                                    data={"train": shards})), tmp_path / "b")
    (sample_a, stats_a), (sample_b, stats_b) = measured
    assert [r.key for r in sample_a] == [r.key for r in sample_b] and stats_a.images == 10
    assert stats_a.to_bytes() == stats_b.to_bytes()
    a, b = read_manifest(tmp_path / "a").refine, read_manifest(tmp_path / "b").refine
    assert a["bn_stats"] == b["bn_stats"] and a["batches"] == b["batches"]
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert tars and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in tars)


def test_observer_bn_stats_leaves_the_run_as_it_was(refine_job, tmp_path, measured):
    """The default records nothing new (manifest included: byte-identical to a run without the keys, which is
    what runs were before them) and measures nothing; `data` changes the refined images."""
    run_distill(load_job(refine_job("plain.toml")), tmp_path / "plain")
    run_distill(load_job(refine_job("obs.toml", refine={"bn_stats": "observer", "bn_stats_images": 7})),
                tmp_path / "obs")
    assert run_files(tmp_path / "plain") == run_files(tmp_path / "obs")
    manifest = read_manifest(tmp_path / "obs")
    assert "bn_stats" not in manifest.refine and "bn_stats" not in manifest.refine["settings"]
    assert not {"bn_stats", "bn_stats_images"} & set(manifest.job["refine"]) and not measured
    run_distill(load_job(refine_job("data.toml", refine=DATA_STATS)), tmp_path / "data")
    assert members(tmp_path / "data" / "distilled-000000.tar") != members(tmp_path / "obs" / "distilled-000000.tar")


def test_statistics_equal_to_the_running_ones_give_the_observer_mode_loss_exactly():
    """The data targets replace the running statistics in the same expression: given the running statistics
    themselves, the loss and the gradient are bit for bit those of bn_stats = observer."""
    obs = small_observer()
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    z0 = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225
    step, labels = draw_step(0, 0, 0, 32, 4), torch.tensor([0, 1, 2])
    results = []
    for data in (False, True):
        refiner = Refiner(RefineConfig(enabled=True, iterations=1, resolutions=[32]), [obs], ["small"], seed=0,
                          resolution=32)
        if data:
            refiner.use_statistics([[(m.running_mean.double().numpy(), m.running_var.double().numpy())
                                     for m in refiner.layers[0]]])
        z = z0.clone().requires_grad_(True)
        with refiner._hooked():
            results.append((refiner.loss_and_grad(z, labels, step, 32, 0), z.grad))
    assert results[0][0] == results[1][0] and results[0][0][2] > 0
    assert torch.equal(results[0][1], results[1][1])
    with pytest.raises(ValueError, match="do not fit"):
        refiner.use_statistics([[(np.zeros(2), np.ones(2))]])


def test_one_set_of_statistics_per_observer(refine_job, data_dir, tmp_path, measured):
    spec = {"kind": "small-cnn", "weights": str(data_dir / "observer-state.pt")}
    run_distill(load_job(refine_job(refine={**DATA_STATS, "observers": [spec, spec]})), tmp_path / "o")
    (_, stats), = measured
    assert len(stats.stats) == 2 and stats.layers[0] == stats.layers[1]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(*stats.stats))
    assert [o["name"] for o in read_manifest(tmp_path / "o").refine["bn_stats"]["observers"]] == \
        ["small-cnn (observer-state.pt)"] * 2


def test_a_resumed_run_reuses_the_recorded_statistics(refine_job, tmp_path, monkeypatch):
    """Killed right after the statistics were committed (events: 2 shards indexed, 2 scored, the statistics):
    the resumed run takes the file as it is (measuring again would fail here) and publishes the bytes of
    the run never interrupted."""
    import hashlib

    import rded.distill
    from test_resume import rded as rded_process

    job = refine_job(refine=DATA_STATS)
    run_distill(load_job(job), tmp_path / "reference")
    out = tmp_path / "out"
    assert rded_process("distill", str(job), "--out", str(out), env={"RDED_TEST_KILL": "event:5"}).returncode == -9
    recorded = out / ".rded-staging" / ".checkpoint" / "bn_stats.json"
    sha = hashlib.sha256(recorded.read_bytes()).hexdigest()

    def measure_again(*args, **kwargs):
        raise AssertionError("a resumed run measured the statistics again")
    monkeypatch.setattr(rded.distill, "measure", measure_again)
    assert main(["distill", str(job), "--out", str(out), "--resume"]) == 0
    assert read_manifest(out).refine["bn_stats"]["sha256"] == sha
    assert run_files(out) == run_files(tmp_path / "reference")
    checkpoint = json.loads((out / "report.json").read_text())["checkpoint"]
    assert checkpoint["units_reused"]["bn_stats"] == 1 and "bn_stats" not in checkpoint["units_computed"]
