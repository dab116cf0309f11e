"""The trainer learns, both label paths run, and evaluation sees every validation sample exactly once."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import NUM_CLASSES
from rded.cli import main
from rded.normalization import IMAGENET
from rded.train import Recipe, ValShards, cutmix, evaluate, lr_factor, train_student


class ColourSquares(torch.utils.data.Dataset):
    """A separable toy set: class c is a noisy image of colour c."""

    COLOURS = torch.tensor([[230, 30, 30], [30, 230, 30], [30, 30, 230]], dtype=torch.float32)

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        noise = torch.randint(-40, 40, (n, 3, 24, 24), generator=g).float()
        self.images = (self.COLOURS[self.labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_trainer_learns_a_separable_toy_set():
    losses = []
    recipe = Recipe(student="resnet18", epochs=6, resolution=24, batch_size=16, lr=3e-3, labels="hard", workers=0)
    model = train_student(ColourSquares(48, 0), 3, recipe, progress=False,
                          on_epoch=lambda log, m: losses.append(log.loss))
    assert losses[-1] < losses[0]
    test = ColourSquares(60, 1)
    with torch.inference_mode():
        pred = model(IMAGENET(test.images)).argmax(1)
    assert (pred == test.labels).float().mean().item() > 0.6  # chance is 1/3


class EpochSquares(ColourSquares):
    """ColourSquares whose images change with the epoch (as stored views do): each epoch shifts the colours."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return (image.int() + 7 * getattr(self, "epoch", 0) - 20).clamp(0, 255).to(torch.uint8), label


def test_training_is_the_same_for_any_worker_count():
    """The shuffle, the epoch's views and CutMix are functions of (seed, epoch): loader workers change nothing."""
    recipe = Recipe(student="resnet18", epochs=3, resolution=24, batch_size=8, labels="hard")
    weights = []
    for workers in (0, 1, 2):
        seen = []
        model = train_student(EpochSquares(20, 0), 3, Recipe(**{**recipe.__dict__, "workers": workers}),
                              progress=False, on_epoch=lambda log, m: seen.append(log.loss))
        weights.append((seen, model.state_dict()))
    for seen, state in weights[1:]:
        assert seen == weights[0][0]
        assert all(torch.equal(state[k], weights[0][1][k]) for k in state)

    class FrozenEpoch(EpochSquares):
        def set_epoch(self, epoch: int) -> None:
            pass

    # the epoch does reach the workers: a set that ignores it trains to other weights
    frozen = train_student(FrozenEpoch(20, 0), 3, Recipe(**{**recipe.__dict__, "workers": 2}), progress=False)
    assert not all(torch.equal(v, weights[0][1][k]) for k, v in frozen.state_dict().items())


def test_cutmix_keeps_the_stated_share_and_schedules_end_where_they_should():
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 20, 20).contiguous()
    for seed in range(20):
        mixed, perm, lam = cutmix(images, torch.Generator().manual_seed(seed))
        kept = (mixed == images).all(dim=1).float().mean(dim=(1, 2))
        for i in range(4):
            if perm[i] != i:
                assert abs(kept[i].item() - lam) < 1e-6
    assert lr_factor(0, 10, "cosine") == 1.0 and abs(lr_factor(10, 10, "cosine")) < 1e-12
    assert abs(lr_factor(10, 10, "authors") - 0.5) < 1e-12


def test_evaluation_sees_every_sample_once_and_matches_brute_force(val_dir):
    import webdataset as wds

    urls = [str(val_dir / f"val-{i:06d}.tar") for i in range(3)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, NUM_CLASSES))
    val = ValShards(urls, NUM_CLASSES, 32)
    acc = evaluate(model, val, batch_size=4, workers=2)
    assert acc.count == NUM_CLASSES * 7 and acc.keys_unique
    correct = 0
    for image, label, _ in val:  # one sample at a time, no loader
        with torch.inference_mode():
            correct += int(model(IMAGENET(image[None])).argmax(1).item() == label)
    assert acc.top1 == correct / acc.count
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(keys) == acc.count


@pytest.mark.parametrize("mode", ["stored", "online", "hard"])
def test_eval_command_runs_every_label_path(baseline_run, val_dir, write_job, tmp_path, mode, capsys):
    args = ["eval", "--distilled", str(baseline_run), "--val", str(val_dir / "val-{000000..000002}.tar"),
            "--epochs", "2", "--student", "resnet18", "--workers", "0", "--quiet", "--out", str(tmp_path / "r.json")]
    if mode == "online":
        args += ["--teacher-online", "--job", str(write_job())]
    if mode == "hard":
        args += ["--hard-labels"]
    assert main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["labels"] == mode and result["val_samples"] == NUM_CLASSES * 7
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["recipe"]["batch_size"] == 6  # the authors' 10 at IPC 2, capped at IPC x classes
    assert "rded eval: resnet18" in capsys.readouterr().err


def test_online_teacher_needs_its_job_when_the_observer_has_files(baseline_run, val_dir, capsys):
    rc = main(["eval", "--distilled", str(baseline_run), "--val", str(val_dir / "val-000000.tar"),
               "--teacher-online", "--epochs", "1", "--quiet"])
    assert rc == 2 and "--job" in capsys.readouterr().err


def test_train_observer_output_loads_as_an_observer(data_dir, val_dir, tmp_path, write_job, capsys):
    from rded.config import load_job
    from rded.distill import run_distill

    weights = tmp_path / "obs.pt"
    assert main(["train-observer", "--train", str(data_dir / "train-{000000..000001}.tar"), "--num-classes",
                 str(NUM_CLASSES), "--arch", "resnet18", "--epochs", "1", "--resolution", "32", "--batch-size", "16",
                 "--workers", "0", "--quiet", "--val", str(val_dir / "val-000000.tar"), "--out", str(weights)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_samples"] > 0 and weights.is_file()
    job = write_job("tv.toml", observer={"kind": "torchvision", "arch": "resnet18", "weights": str(weights),
                                         "num_outputs": NUM_CLASSES})
    summary = run_distill(load_job(job), tmp_path / "out")
    assert summary.images == NUM_CLASSES * 2
