"""A run directory (and a slice) read as it is by the clients people train with: webdataset, Hugging Face
`datasets` (through the run's README.md dataset card) and timm's `wds/` reader (through its _info.json).
Each client is skipped when it is not installed (`pip install -e .[test]` brings them)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from rded.cards import CARD, CARD_FILES, TIMM_INFO, class_names, write_cards
from rded.cli import main
from rded.config import load_job
from rded.distill import run_distill
from rded.rundir import read_manifest, verify_run


@pytest.fixture(scope="module")
def sliced(baseline_run, tmp_path_factory) -> Path:
    """The IPC 1 slice of the tiny run, cut by the command line."""
    out = tmp_path_factory.mktemp("slice") / "ipc1"
    assert main(["slice", str(baseline_run), "--ipc", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(params=["run", "slice"])
def run_dir(request, baseline_run, sliced) -> Path:
    return baseline_run if request.param == "run" else sliced


def expected_counts(run: Path) -> Counter:
    """Images per class index, from the manifest."""
    return Counter({c.index: c.images for c in read_manifest(run).classes if c.images})


def test_webdataset_reads_images_and_hard_labels(run_dir):
    wds = pytest.importorskip("webdataset")
    manifest = read_manifest(run_dir)
    urls = [str(run_dir / s.name) for s in manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(samples) == manifest.images
    assert Counter(cls for _, cls in samples) == expected_counts(run_dir)
    assert {image.size for image, _ in samples} == {(manifest.resolution, manifest.resolution)}


def load_hf(run: Path, cache: Path):
    datasets = pytest.importorskip("datasets")
    return datasets, datasets.load_dataset(str(run), cache_dir=str(cache))


def test_hugging_face_reads_the_image_shards_once_with_class_names(run_dir, tmp_path):
    datasets, loaded = load_hf(run_dir, tmp_path / "hf")
    manifest = read_manifest(run_dir)
    assert list(loaded) == ["train"]  # the card's one split: the label shards beside are not rows
    ds = loaded["train"]
    assert ds.num_rows == manifest.images and any(run_dir.glob("labels-*.tar"))
    cls = ds.features["cls"]
    assert isinstance(cls, datasets.ClassLabel) and cls.names == [c.name for c in manifest.classes]
    assert Counter(ds["cls"]) == expected_counts(run_dir)
    for row in ds:  # the names sit at the right indices: each image's provenance names its class
        assert row["jpg"].size == (manifest.resolution, manifest.resolution)
        assert cls.int2str(row["cls"]) == row["json"]["class_name"] and row["json"]["class"] == row["cls"]
        assert row["__key__"].startswith(f"{row['cls']:05d}_")


def test_the_cards_provenance_schema_is_the_one_hugging_face_infers(baseline_run, tmp_path):
    """The card declares every feature (declaring `cls` turns inference off): the provenance's must be what
    datasets would infer from the shards themselves, or it would drop or mistype fields."""
    datasets, loaded = load_hf(baseline_run, tmp_path / "card")
    inferred = datasets.load_dataset("webdataset", data_files={"train": str(baseline_run / "distilled-*.tar")},
                                     cache_dir=str(tmp_path / "inferred"))["train"]
    card = loaded["train"].features
    assert {k: v for k, v in card.items() if k != "cls"} == {k: v for k, v in inferred.features.items() if k != "cls"}
    assert list(card) == list(inferred.features)


def test_timm_finds_the_split_by_name_and_trains_a_step(run_dir):
    pytest.importorskip("timm")
    from timm.data import create_dataset, create_loader

    manifest = read_manifest(run_dir)
    evaluation = create_dataset("wds/rded", root=str(run_dir), split="train")
    assert len(evaluation) == manifest.images
    assert Counter(int(target) for _, target in evaluation) == expected_counts(run_dir)
    train = create_dataset("wds/rded", root=str(run_dir), split="train", is_training=True, batch_size=2)
    loader = create_loader(train, input_size=(3, 32, 32), batch_size=2, is_training=True, use_prefetcher=False,
                           num_workers=0)
    images, targets = next(iter(loader))
    assert tuple(images.shape) == (2, 3, 32, 32) and images.dtype.is_floating_point
    assert set(targets.tolist()) <= set(expected_counts(run_dir))
    info = json.loads((run_dir / TIMM_INFO).read_text())
    assert info["num_classes"] == len(manifest.classes)


def test_cards_change_no_shard_byte_and_are_made_again_the_same(run_dir, tmp_path):
    """The cards are not in the manifest's hashes; they are a function of the manifest and the shards:
    rewriting them leaves every shard verifying and gives the published bytes again."""
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    published = {name: (copy / name).read_bytes() for name in CARD_FILES}
    shards = {p.name: p.read_bytes() for p in copy.glob("*.tar")}
    for name in CARD_FILES:
        (copy / name).unlink()
    manifest = verify_run(copy)
    assert write_cards(copy, manifest) == list(CARD_FILES)
    assert {name: (copy / name).read_bytes() for name in CARD_FILES} == published
    assert {p.name: p.read_bytes() for p in copy.glob("*.tar")} == shards
    verify_run(copy)
    assert CARD not in json.dumps(manifest.to_json()) and TIMM_INFO not in json.dumps(manifest.to_json())
    if manifest.sliced_from:  # a slice has its own cards: its origin, its shards
        assert "cut by `rded slice` from a run of IPC 2" in published[CARD].decode()
        assert json.loads(published[TIMM_INFO])["splits"]["train"]["filenames"] == ["distilled-000000.tar"]


def test_a_subset_of_classes_keeps_its_indices_and_names_every_index(write_job, tmp_path):
    """data.class_subset: `.cls` keeps the data set's indices (0 and 2 of 3), so the ClassLabel and timm's
    class count cover 0..2, the index without a class in the run named `unused-1`."""
    pytest.importorskip("datasets")
    run = tmp_path / "out"
    run_distill(load_job(write_job(data={"class_subset": [0, 2]})), run)
    _, loaded = load_hf(run, tmp_path / "hf")
    ds = loaded["train"]
    assert ds.features["cls"].names == ["circle", "unused-1", "triangle"]
    assert Counter(ds["cls"]) == Counter({0: 2, 2: 2})
    assert all(ds.features["cls"].int2str(r["cls"]) == r["json"]["class_name"] for r in ds)
    assert json.loads((run / TIMM_INFO).read_text())["num_classes"] == 3


def test_repeated_class_names_are_made_distinct(baseline_run):
    """ImageNet names two classes "crane": a ClassLabel refuses repeated names, so they carry their index."""
    manifest = read_manifest(baseline_run)
    renamed = replace(manifest, classes=[replace(c, name="crane" if c.index else "crane (2)") for c in manifest.classes])
    names = class_names(renamed)
    assert names == ["crane (2) (0)", "crane (1)", "crane (2) (2)"] and len(set(names)) == len(names)
