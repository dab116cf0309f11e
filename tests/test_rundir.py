"""The run directory: a typed manifest whose format is checked on every read, sha256 verified whenever a run
is read (loader, slice, eval), and a demo that is reproducible to the byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rded.cli import main
from rded.errors import RunError
from rded.loader import DistilledDataset
from rded.rundir import MANIFEST_FORMAT, Manifest, read_manifest, slice_run, verify_run


@pytest.fixture
def run_copy(baseline_run, tmp_path) -> Path:
    return Path(shutil.copytree(baseline_run, tmp_path / "run"))


def rewrite_manifest(run: Path, **changes) -> None:
    data = json.loads((run / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    (run / "manifest.json").write_text(json.dumps(data))


def tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first member's data: the tar still reads, the bytes differ
    path.write_bytes(bytes(data))


def test_manifest_round_trips_byte_for_byte(baseline_run):
    text = (baseline_run / "manifest.json").read_text()
    manifest = read_manifest(baseline_run)
    assert manifest.format == MANIFEST_FORMAT and manifest.images == len(DistilledDataset(baseline_run))
    assert json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n" == text


@pytest.mark.parametrize("changes,needle", [
    ({"format": "something-else/1"}, "not an rded manifest (format 'something-else/1')"),
    ({"format": None}, "not an rded manifest (no format)"),
    ({"format": "rded-distilled/2"}, "newer than this rded reads"),
    ({"format": "rded-distilled/x"}, "not an rded manifest"),
    ({"shards": None}, "manifest lacks shards"),
    ({"surprise": 1}, "malformed manifest"),
])
def test_manifest_format_is_checked_on_every_read(run_copy, tmp_path, capsys, changes, needle):
    rewrite_manifest(run_copy, **changes)
    for read in (read_manifest, DistilledDataset, lambda run: slice_run(run, 1, tmp_path / "s1")):
        with pytest.raises(RunError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            read(run_copy)
    assert main(["slice", str(run_copy), "--ipc", "1", "--out", str(tmp_path / "s2")]) == 2
    assert needle in capsys.readouterr().err


def test_manifest_that_is_not_json_is_refused(run_copy):
    (run_copy / "manifest.json").write_text("{ not json")
    with pytest.raises(RunError, match="not valid JSON"):
        read_manifest(run_copy)


@pytest.mark.parametrize("which", ["distilled-000000.tar", "labels-000001.tar"])
def test_a_tampered_shard_is_refused_with_its_name(run_copy, tmp_path, capsys, which):
    verify_run(run_copy)  # intact: passes
    tamper(run_copy / which)
    with pytest.raises(RunError, match=f"{which}: sha256 .* does not match"):
        verify_run(run_copy)
    with pytest.raises(RunError, match=which):
        DistilledDataset(run_copy)
    # slice copies tier-1 shards only: shard 000000 is tier 1, shard 000001 is not (and is not read)
    if which.endswith("000000.tar"):
        assert main(["slice", str(run_copy), "--ipc", "1", "--out", str(tmp_path / "s")]) == 2
        assert which in capsys.readouterr().err
    else:
        assert main(["slice", str(run_copy), "--ipc", "1", "--out", str(tmp_path / "s")]) == 0
    assert main(["slice", str(run_copy), "--ipc", "2", "--out", str(tmp_path / "s2")]) == 2
    assert which in capsys.readouterr().err


def test_eval_refuses_a_tampered_run(run_copy, tmp_path, capsys):
    tamper(run_copy / "labels-000000.tar")
    val = sorted(run_copy.glob("distilled-*.tar"))[0]
    rc = main(["eval", "--distilled", str(run_copy), "--val", str(val), "--epochs", "1", "--quiet"])
    assert rc == 2 and "labels-000000.tar: sha256" in capsys.readouterr().err


def test_a_missing_shard_is_refused(run_copy):
    (run_copy / "distilled-000001.tar").unlink()
    with pytest.raises(RunError, match="distilled-000001.tar: missing"):
        DistilledDataset(run_copy)


def test_slice_manifest_is_typed_and_records_its_source(baseline_run, tmp_path):
    sliced = slice_run(baseline_run, 1, tmp_path / "s1")
    again = read_manifest(tmp_path / "s1")
    assert isinstance(again, Manifest) and again == sliced
    assert again.sliced_from == {"ipc": 2, "tiers": [1, 2]} and again.tiers == [1]
    assert all(c.images == 1 for c in again.classes)
    verify_run(tmp_path / "s1")


def test_a_slice_cannot_replace_its_own_run(run_copy, capsys):
    assert main(["slice", str(run_copy), "--ipc", "1", "--out", str(run_copy), "--overwrite"]) == 2
    assert "cannot replace the run it is cut from" in capsys.readouterr().err
    verify_run(run_copy)  # untouched


def test_resized_crop_equals_torchvision(tmp_path):
    """The loader's torch-only resized crop is torchvision's, pixel for pixel (so labels match views)."""
    from torchvision.transforms.v2 import functional as TF

    from rded.geometry import resized_crop

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 57, 57), dtype=torch.uint8, generator=g)
    for x, y, w, h, size in [(0, 0, 57, 57, 32), (3, 5, 40, 33, 57), (10, 2, 20, 50, 64), (0, 0, 57, 57, 57)]:
        ours = resized_crop(image, (x, y, w, h), size)
        theirs = TF.resized_crop(image, top=y, left=x, height=h, width=w, size=[size, size], antialias=True)
        assert torch.equal(ours, theirs), (x, y, w, h, size)


def test_normalizations_are_the_published_ones():
    from rded.normalization import IMAGENET, LITE

    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
    assert torch.equal(LITE(x), (x.float() - 127.0) / 128.0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(IMAGENET(x), (x.float() / 255 - mean) / std, atol=1e-5)


def test_demo_runs_end_to_end_and_twice_gives_identical_shards(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["demo", "--out", str(tmp_path / name), "--train-steps", "15"]) == 0
        assert "rded demo finished" in capsys.readouterr().out
    m10 = json.loads((tmp_path / "a" / "ipc10" / "manifest.json").read_text())
    m1 = json.loads((tmp_path / "a" / "ipc1" / "manifest.json").read_text())
    assert m10["images"] == 60 and m1["images"] == 6
    assert (tmp_path / "a" / "ipc10" / "contact-sheet.png").is_file()
    for sub in ("ipc10", "ipc1"):
        names = sorted(p.name for p in (tmp_path / "a" / sub).glob("*.tar"))
        assert names and names == sorted(p.name for p in (tmp_path / "b" / sub).glob("*.tar"))
        for name in names:
            assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes(), name
    assert (tmp_path / "a" / "observer.pt").read_bytes() == (tmp_path / "b" / "observer.pt").read_bytes()
