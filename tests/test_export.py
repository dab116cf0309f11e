"""`rded export`: a finished run or slice as an image folder, DD-Ranking tensors or .npy view labels, checked
against the shards themselves (tarfile, Pillow), the codec's own decode and a recomputation of the views."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import job_text, tar_members
from rded.cli import main
from rded.errors import RunError
from rded.export import STAGING, export_run
from rded.geometry import draw_view
from rded.labels import decode_image_labels, unpack_logits
from rded.rundir import read_manifest


@pytest.fixture(scope="module")
def exports(baseline_run, tmp_path_factory) -> dict[str, Path]:
    """The baseline run exported once in every format (read-only for the tests)."""
    root = tmp_path_factory.mktemp("exports")
    for fmt in ("imagefolder", "ddranking", "arrays"):
        export_run(baseline_run, fmt, root / fmt)
    return {fmt: root / fmt for fmt in ("imagefolder", "ddranking", "arrays")}


@pytest.fixture(scope="module")
def short_run(data_dir, tmp_path_factory) -> Path:
    """Classes 0 and 2 only, IPC 3 of which each class can fill 2 images (8 drawn samples, 4 cells each)."""
    from rded.config import load_job
    from rded.distill import run_distill

    tmp = tmp_path_factory.mktemp("short")
    job = tmp / "job.toml"
    job.write_text(job_text(data_dir, data={"class_subset": [0, 2]}, distill={"ipc": 3, "slices": [1, 3]}))
    run_distill(load_job(job), tmp / "out")
    return tmp / "out"


@pytest.fixture(scope="module")
def partial_run(data_dir, tmp_path_factory) -> Path:
    """Labels of the top 2 of 3 classes, the third from the image's tail basis (rded-soft-labels/2 partial)."""
    from rded.config import load_job
    from rded.distill import run_distill

    tmp = tmp_path_factory.mktemp("partial")
    job = tmp / "job.toml"
    job.write_text(job_text(data_dir, relabel={"views": 3, "topk": 2, "exact_classes": 0}))
    run_distill(load_job(job), tmp / "out")
    return tmp / "out"


def shard_images(run: Path) -> list[tuple[str, int, bytes, dict]]:
    """(key, class, image bytes, provenance) of every image in manifest order, read with tarfile alone."""
    out = []
    for shard in json.loads((run / "manifest.json").read_text())["shards"]:
        members = tar_members(run / shard["name"])
        for name in members:
            if name.endswith(".jpg"):
                key = name[:-4]
                out.append((key, int(members[f"{key}.cls"]), members[name], json.loads(members[f"{key}.json"])))
    return out


def stored_views(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """key -> (view records, tail), decoded from the label shards by rded.labels."""
    out = {}
    for shard in json.loads((run / "manifest.json").read_text())["shards"]:
        for name, data in tar_members(run / shard["labels"]["name"]).items():
            views, _, tail = decode_image_labels(data)
            out[name.split(".", 1)[0]] = (views, tail)
    return out


def label_of(run: Path) -> dict[int, int]:
    indices = sorted(c["index"] for c in json.loads((run / "manifest.json").read_text())["classes"] if c["images"])
    return {index: n for n, index in enumerate(indices)}


def expected_paths(run: Path) -> dict[str, bytes]:
    """The authors' layout, brute force: class folders renumbered, ids in tier order."""
    labels, seen, out = label_of(run), {}, {}
    for key, cls, data, provenance in shard_images(run):
        n = seen.get(cls, 0)
        seen[cls] = n + 1
        assert provenance["image_index"] == n  # tier order is image order within a class
        out[f"{labels[cls]:05d}/class{labels[cls]:05d}_id{n:05d}.jpg"] = data
    return out


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_imagefolder_is_the_authors_layout_with_the_shard_bytes(baseline_run, exports):
    out = exports["imagefolder"]
    expected = expected_paths(baseline_run)
    assert files_under(out) == set(expected) | {"classes.json", "classes.txt", "export.json"}
    for rel, data in expected.items():
        assert (out / rel).read_bytes() == data, rel  # no re-encoding
    classes = read_manifest(baseline_run).classes
    assert json.loads((out / "classes.json").read_text()) == [
        {"label": n, "index": c.index, "name": c.name, "images": c.images} for n, c in enumerate(classes)]
    assert (out / "classes.txt").read_text() == "".join(f"{c.name}\n" for c in classes)
    record = json.loads((out / "export.json").read_text())
    assert record["export"] == "imagefolder" and set(record["files"]) == files_under(out) - {"export.json"}


def test_torchvision_imagefolder_reads_it_renumbered(baseline_run, exports, short_run, tmp_path):
    from torchvision import datasets

    folder = datasets.ImageFolder(str(exports["imagefolder"]))
    assert folder.classes == ["00000", "00001", "00002"] and folder.targets == [0, 0, 1, 1, 2, 2]
    image, target = folder[3]
    assert image.size == (32, 32) and target == 1
    # ImageFolder's order (sorted paths) is the ddranking export's: its tensors line up with the folder
    pixels = torch.load(exports["ddranking"] / "images.pt")
    for i, (path, _) in enumerate(folder.samples):
        assert np.array_equal(np.array(Image.open(path).convert("RGB")), pixels[i].permute(1, 2, 0).numpy()), path
    # classes 0 and 2 of the data set, 2 images each of IPC 3: labels 0 and 1, the short classes kept
    export_run(short_run, "imagefolder", tmp_path / "short")
    folder = datasets.ImageFolder(str(tmp_path / "short"))
    assert folder.classes == ["00000", "00001"] and folder.targets == [0, 0, 1, 1]
    assert [c["index"] for c in json.loads((tmp_path / "short" / "classes.json").read_text())] == [0, 2]
    images = files_under(tmp_path / "short") - {"classes.json", "classes.txt", "export.json"}
    assert images == set(expected_paths(short_run))


def test_ddranking_is_class_major_with_the_decoded_pixels_and_view_mean_labels(baseline_run, exports):
    out = exports["ddranking"]
    images, labels = torch.load(out / "images.pt"), torch.load(out / "labels.pt")
    soft = torch.load(out / "soft_labels.pt")
    ipc, classes = 2, read_manifest(baseline_run).classes
    assert images.dtype == torch.uint8 and images.shape == (len(classes) * ipc, 3, 32, 32)
    assert labels.tolist() == [n for n in range(len(classes)) for _ in range(ipc)]
    assert soft.dtype == torch.float32 and soft.shape == (len(classes) * ipc, len(classes))
    assert [c["name"] for c in json.loads((out / "classes.json").read_text())] == [c.name for c in classes]
    views, seen = stored_views(baseline_run), {}
    for key, cls, data, _ in shard_images(baseline_run):
        n = seen.get(cls, 0)
        seen[cls] = n + 1
        row = label_of(baseline_run)[cls] * ipc + n
        pixels = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(images[row].permute(1, 2, 0).numpy(), pixels), key
        # brute force: the mean of the views' probabilities at T = 1
        records, tail = views[key]
        probs = torch.softmax(torch.from_numpy(unpack_logits(records, 3, tail)).double(), dim=1).mean(dim=0)
        assert torch.allclose(soft[row].double().exp(), probs, atol=1e-6), key
    record = json.loads((out / "export.json").read_text())
    assert record["tensors"]["soft_labels.pt"]["temperature"] == 1.0
    assert record["tensors"]["images.pt"]["shape"] == list(images.shape)


def test_the_whole_image_label_is_the_mean_view_probability_over_the_kept_classes():
    """The tiny run's untrained observer gives nearly equal views, so the rule is checked on spread-out logits:
    the mean of probabilities (not of logits), restricted to the exported classes and renormalised."""
    from rded.export import whole_image_log_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64) * 4
    logits[2, 3] = -float("inf")  # a class a view gives no mass (v2 `rest` can be -inf)
    columns = np.array([0, 3, 6])
    probs = torch.softmax(logits, dim=1).mean(dim=0)[columns]
    ours = whole_image_log_probs(logits.numpy(), columns)
    assert np.allclose(np.exp(ours), (probs / probs.sum()).numpy(), atol=1e-12, rtol=1e-9)
    assert not np.allclose(np.exp(ours), torch.softmax(logits.clamp(min=-50).mean(0)[columns], 0).numpy(), atol=1e-3)
    dead = np.zeros((2, 3))
    dead[:, 1] = -np.inf  # no mass at all: the floor, not -inf
    assert whole_image_log_probs(dead, np.arange(3)).tolist()[1] == -1000.0


def test_ddranking_refuses_a_run_with_short_classes_naming_them(short_run, tmp_path, capsys):
    with pytest.raises(RunError, match=r"exactly 3 images per class.*'circle' \(2 of 3\).*'triangle' \(2 of 3\)"):
        export_run(short_run, "ddranking", tmp_path / "dd")
    assert not (tmp_path / "dd").exists()
    assert main(["export", str(short_run), "--format", "ddranking", "--out", str(tmp_path / "dd")]) == 2
    assert "'circle' (2 of 3)" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["exact", "partial"])
def test_arrays_hold_the_stored_view_logits_and_geometry(baseline_run, partial_run, exports, tmp_path, which):
    import webdataset as wds

    if which == "partial":
        baseline_run, out = partial_run, tmp_path / "arrays"
        export_run(partial_run, "arrays", out)
    else:
        out = exports["arrays"]
    manifest = read_manifest(baseline_run)
    assert manifest.labels["topk"] == (2 if which == "partial" else 3)
    seed, factor, s = manifest.job["distill"]["seed"], manifest.job["distill"]["factor"], manifest.resolution
    views = stored_views(baseline_run)
    names = [shard.name for shard in manifest.shards]
    for name in names:  # the image shards are copied byte for byte
        assert (out / name).read_bytes() == (baseline_run / name).read_bytes()
    tars = [str(out / n.replace("distilled-", "labels-arrays-")) for n in names]
    seen = []
    for sample in wds.WebDataset(tars, shardshuffle=False).decode():
        key, logits, geometry = sample["__key__"], sample["logits.npy"], sample["views.npy"]
        records, tail = views[key]
        assert logits.dtype == np.float16 and logits.shape == (3, 3)
        assert np.array_equal(logits, unpack_logits(records, 3, tail).astype(np.float16)), key
        assert geometry.dtype == np.uint8 and geometry.shape == (3, 2 * factor + 5)
        fields = ("col_perm", "row_perm", "crop")
        stored = np.concatenate([records[f] for f in fields] + [records["flip"][:, None]], axis=1)
        assert np.array_equal(geometry, stored), key
        for v in range(3):  # and the views recomputed from (seed, key, view)
            view = draw_view(seed, key, v, s, factor)
            assert geometry[v].tolist() == [*view.col_perm, *view.row_perm, *view.crop, int(view.flip)], (key, v)
        seen.append(key)
    assert seen == [key for key, *_ in shard_images(baseline_run)]
    record = json.loads((out / "export.json").read_text())
    assert record["members"]["views.npy"]["columns"][-5:] == ["x", "y", "w", "h", "flip"]
    assert record["bytes"] == {"labels_arrays": sum((out / Path(t).name).stat().st_size for t in tars),
                               "labels_compact": manifest.labels["bytes"]}


def test_a_slice_exports_the_first_images_of_each_class(baseline_run, exports, tmp_path):
    assert main(["slice", str(baseline_run), "--ipc", "1", "--out", str(tmp_path / "s1")]) == 0
    assert main(["export", str(tmp_path / "s1"), "--format", "ddranking", "--out", str(tmp_path / "dd")]) == 0
    full = exports["ddranking"]
    for name in ("images.pt", "soft_labels.pt"):  # id 0 of each class: rows 0, 2, 4 of the IPC 2 export
        assert torch.equal(torch.load(tmp_path / "dd" / name), torch.load(full / name)[0::2]), name
    assert torch.load(tmp_path / "dd" / "labels.pt").tolist() == [0, 1, 2]


def test_cli_exports_and_refuses_bad_output_and_format(baseline_run, exports, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", str(baseline_run), "--format", "imagefolder", "--out", str(out)]) == 0
    assert "6 images of 3 classes" in capsys.readouterr().out
    mine = {"notes.txt", "00000/mine.txt"}  # the user's files, one inside a folder of the export
    for rel in mine:
        (out / rel).write_text("mine")
    # an existing export is not replaced without --overwrite
    assert main(["export", str(baseline_run), "--format", "ddranking", "--out", str(out)]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "--overwrite" in err
    assert files_under(out) == files_under(exports["imagefolder"]) | mine
    # --overwrite removes the previous export's files only, and folders only when they are left empty
    assert main(["export", str(baseline_run), "--format", "imagefolder", "--out", str(out), "--overwrite"]) == 0
    assert files_under(out) == files_under(exports["imagefolder"]) | mine
    assert main(["export", str(baseline_run), "--format", "ddranking", "--out", str(out), "--overwrite"]) == 0
    assert files_under(out) == files_under(exports["ddranking"]) | mine
    assert (out / "images.pt").read_bytes() == (exports["ddranking"] / "images.pt").read_bytes()
    # 00000 is now the user's folder, not the previous export's
    assert main(["export", str(baseline_run), "--format", "imagefolder", "--out", str(out), "--overwrite"]) == 2
    assert "00000: exists and is not part of the previous export" in capsys.readouterr().err
    assert files_under(out) == files_under(exports["ddranking"]) | mine
    # a directory that is not an export is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    assert main(["export", str(baseline_run), "--format", "arrays", "--out", str(other)]) == 2
    assert main(["export", str(baseline_run), "--format", "arrays", "--out", str(other), "--overwrite"]) == 2
    assert "not a previous export" in capsys.readouterr().err and files_under(other) == {"data.bin"}
    assert main(["export", str(baseline_run), "--format", "tiff", "--out", str(tmp_path / "t")]) == 2
    assert "--format" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_a_failed_export_leaves_nothing_that_looks_complete(baseline_run, tmp_path):
    run = Path(shutil.copytree(baseline_run, tmp_path / "run"))
    data = bytearray((run / "labels-000001.tar").read_bytes())
    data[700] ^= 0xFF  # the second label shard: the first shard's files are written when it is found
    (run / "labels-000001.tar").write_bytes(bytes(data))
    with pytest.raises(RunError, match="labels-000001.tar: sha256"):
        export_run(run, "arrays", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="labels-000001.tar: sha256"):
        export_run(run, "arrays", tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_an_interrupted_publish_is_replaced_by_the_next_export(baseline_run, tmp_path):
    out = tmp_path / "e"
    export_run(baseline_run, "imagefolder", out)
    # as if killed before export.json was moved in: the files are there, the record still in the staging folder
    (out / STAGING).mkdir()
    (out / "export.json").rename(out / STAGING / "export.json")
    with pytest.raises(Exception, match="not empty"):
        export_run(baseline_run, "imagefolder", out)
    record = export_run(baseline_run, "imagefolder", out, overwrite=True)
    assert files_under(out) == set(record["files"]) | {"export.json"} and not (out / STAGING).exists()
    # a failed export's staging folder alone counts as empty
    shutil.rmtree(out)
    (out / STAGING / "00000").mkdir(parents=True)
    export_run(baseline_run, "ddranking", out)
    assert not (out / STAGING).exists()


def test_hugging_face_reads_the_arrays_as_their_shapes(exports, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tars = sorted(str(p) for p in exports["arrays"].glob("labels-arrays-*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path))
    assert ds.features["logits.npy"].feature.feature.dtype == "float16"
    assert ds.features["views.npy"].feature.feature.dtype == "uint8"
    rows = ds.with_format("numpy")
    assert len(rows) == 6 and rows[0]["logits.npy"].shape == (3, 3) and rows[0]["views.npy"].shape == (3, 9)
