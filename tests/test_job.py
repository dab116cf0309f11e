"""The whole job on tiny data: reproducibility, slicing, accounting, read-back, atomic outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import BAD, NUM_CLASSES, PER_CLASS, compute_of, sample_keys, tar_members
from rded.cli import main
from rded.config import load_job
from rded.distill import run_distill

CELLS = 4  # factor 2


def shards_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("distilled-*.tar"))}


def images_of(out: Path) -> dict[str, dict]:
    """key -> {'jpg', 'cls', 'json'} from every shard of a run."""
    images: dict[str, dict] = {}
    for shard in sorted(out.glob("distilled-*.tar")):
        for name, data in tar_members(shard).items():
            key, ext = name.split(".", 1)
            images.setdefault(key, {})[ext] = data
    return images


def test_rerun_is_byte_identical(baseline_run, write_job, tmp_path):
    run_distill(load_job(write_job()), tmp_path / "again")
    assert shards_of(tmp_path / "again") == shards_of(baseline_run)
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (baseline_run / "manifest.json").read_bytes()
    assert (tmp_path / "again" / "samples.tsv").read_bytes() == (baseline_run / "samples.tsv").read_bytes()


def test_batch_size_threads_and_shard_order_do_not_change_output(baseline_run, write_job, data_dir, tmp_path):
    job = write_job(runtime={"batch_size": 3, "dali_threads": 2, "progress": False})
    run_distill(load_job(job), tmp_path / "b3")
    assert shards_of(tmp_path / "b3") == shards_of(baseline_run)
    reversed_order = [str(data_dir / "train-000001.tar"), str(data_dir / "train-000000.tar")]
    run_distill(load_job(write_job("rev.toml", data={"train": reversed_order})), tmp_path / "rev")
    # provenance names shards as the job wrote them, so compare the images, not the bytes of the json
    a, b = images_of(baseline_run), images_of(tmp_path / "rev")
    assert a.keys() == b.keys()
    assert all(a[k]["jpg"] == b[k]["jpg"] for k in a)


def test_output_layout_and_manifest(baseline_run):
    manifest = json.loads((baseline_run / "manifest.json").read_text())
    assert manifest["tiers"] == [1, 2] and manifest["images"] == NUM_CLASSES * 2
    for s in manifest["shards"]:
        from rded.tario import sha256_file
        assert sha256_file(baseline_run / s["name"]) == s["sha256"]
    # tier 1 (image 0 of every class) comes first and fills its own shard(s)
    first = tar_members(baseline_run / manifest["shards"][0]["name"])
    assert {n.split(".")[0] for n in first} == {f"{c:05d}_0000" for c in range(NUM_CLASSES)}
    assert (baseline_run / "contact-sheet.png").is_file()
    assert not list(baseline_run.glob(".*"))  # no staging or partial files left


def all_key_patches(data_dir: Path, job) -> dict[int, list[tuple[float, str]]]:
    """Brute force: score every drawn image's crops with the pipeline's pieces, take each image's best
    crop, and sort each class's key patches best first."""
    import torch

    from rded.crops import Cutter, CutRequest, image_size
    from rded.keyed import crop_window
    from rded.observer import build_observer
    from rded.records import SampleRef
    from rded.score import Scorer
    from rded.select import SubsetDraw
    from rded.source import expand_shards, load_classes, scan_shard
    from rded.tario import read_member

    cfg = job.distill
    shards = expand_shards(job)
    draw = SubsetDraw(cfg.seed, cfg.subset)
    for i, s in enumerate(shards):
        for rec in scan_shard(i, s.path):
            if isinstance(rec, SampleRef) and 0 <= rec.label < NUM_CLASSES:
                draw.offer(rec)
    drawn, _ = draw.finish()
    observer = build_observer(job, load_classes(job), compute_of(job))
    scorer = Scorer(observer, mode=cfg.score_mode, resolution=cfg.resolution, score_batch=job.runtime.score_batch,
                    decimals=cfg.score_decimals)
    cutter = Cutter(cfg.crops, batch_size=1, num_threads=1, decoder="cpu", device_id=None)
    result: dict[int, list[tuple[float, str]]] = {}
    for c, refs in drawn.items():
        for ref in refs:
            enc = read_member(shards[ref.shard].path, ref.offset, ref.size)
            size = image_size(enc)
            if size is None:
                continue
            wins = [crop_window(cfg.seed, ref.key, k, *size) for k in range(cfg.crops)]
            cut = cutter.cut([CutRequest(enc, wins, [(cfg.patch_size,) * 2] * cfg.crops)])[0]
            if cut is None:
                continue
            scores = scorer.score(np.stack(cut), np.full(cfg.crops, c))
            result.setdefault(c, []).append((float(scores.max()), ref.key))
        result[c].sort(key=lambda t: (-t[0], t[1]))
    return result


def test_slice_to_ipc1_is_first_image_of_each_class_from_exact_top4(baseline_run, write_job, data_dir, tmp_path):
    assert main(["slice", str(baseline_run), "--ipc", "1", "--out", str(tmp_path / "ipc1")]) == 0
    sliced = images_of(tmp_path / "ipc1")
    full = images_of(baseline_run)
    assert sorted(sliced) == [f"{c:05d}_0000" for c in range(NUM_CLASSES)]
    for key, members in sliced.items():
        assert members == full[key]
    brute = all_key_patches(data_dir, load_job(write_job()))
    for c in range(NUM_CLASSES):
        meta = json.loads(sliced[f"{c:05d}_0000"]["json"])
        assert [cell["rank"] for cell in meta["cells"]] == [0, 1, 2, 3]
        assert [cell["source"]["key"] for cell in meta["cells"]] == [k for _, k in brute[c][:CELLS]]
        assert [cell["score"] for cell in meta["cells"]] == [s for s, _ in brute[c][:CELLS]]
    manifest = json.loads((tmp_path / "ipc1" / "manifest.json").read_text())
    assert manifest["ipc"] == 1 and manifest["images"] == NUM_CLASSES
    assert main(["slice", str(baseline_run), "--ipc", "3", "--out", str(tmp_path / "bad")]) == 2


def test_every_input_sample_is_accounted_once(baseline_run, data_dir):
    rows = [line.split("\t") for line in (baseline_run / "samples.tsv").read_text().splitlines()[1:]]
    ledger_keys = sorted((shard.rsplit("/", 1)[-1], key) for key, shard, _, _, _ in rows)
    input_keys = sorted((p.name, k) for p in sorted(data_dir.glob("train-*.tar")) for k in sample_keys(p))
    assert ledger_keys == input_keys  # each input sample exactly once
    report = json.loads((baseline_run / "report.json").read_text())
    acc = report["accounting"]
    assert acc["input_samples"] == len(input_keys) == NUM_CLASSES * PER_CLASS + sum(BAD.values())
    assert acc["distilled"] + acc["scored"] + acc["not_drawn"] + acc["excluded_class"] + sum(
        acc["skipped"].values()) == acc["input_samples"]
    status = {key: (st, reason) for key, _, st, reason, _ in rows}
    for kind in ("missing_label", "unknown_class", "bad_label"):  # found by the index pass
        (bad_key,) = [k for k in status if k.startswith(f"bad_{kind}_")]
        assert status[bad_key] == ("skipped", kind)
    # a broken image is found only if drawn: undrawn samples are never decoded
    (broken,) = [k for k in status if k.startswith("bad_undecodable_")]
    assert status[broken] in {("skipped", "undecodable"), ("not_drawn", "")}
    assert acc["distilled"] == NUM_CLASSES * 2 * CELLS
    # labelled samples: every class's images plus the broken image (class 0); 8 drawn per class
    assert acc["not_drawn"] == NUM_CLASSES * PER_CLASS + 1 - NUM_CLASSES * 8


def test_drawn_undecodable_image_is_skipped_and_the_rest_kept(write_job, tmp_path):
    run_distill(load_job(write_job(distill={"subset": 100})), tmp_path / "all")
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    assert report["accounting"]["skipped"]["undecodable"] == 1
    assert report["accounting"]["not_drawn"] == 0
    manifest = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert all(c["images"] == 2 for c in manifest["classes"])


def test_shards_read_back_with_webdataset(baseline_run):
    import webdataset as wds

    manifest = json.loads((baseline_run / "manifest.json").read_text())
    urls = [str(baseline_run / s["name"]) for s in manifest["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg", "cls", "json")
    rows = list(ds)
    assert len(rows) == manifest["images"]
    for image, label, meta in rows:
        assert image.shape == (32, 32, 3) and meta["class"] == label
        assert len(meta["cells"]) == CELLS


def test_shards_read_back_with_dali(baseline_run):
    from nvidia.dali import fn, pipeline_def, types

    manifest = json.loads((baseline_run / "manifest.json").read_text())
    paths = [str(baseline_run / s["name"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=manifest["images"], num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(paths=paths, ext=["jpg", "cls"], missing_component_behavior="error")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    pipe = read()
    pipe.build()
    images, labels = pipe.run()
    assert len(images) == manifest["images"]
    assert all(np.array(images[i]).shape == (32, 32, 3) for i in range(len(images)))
    got = sorted(int(bytes(np.array(labels[i])).decode()) for i in range(len(labels)))
    assert got == sorted(list(range(NUM_CLASSES)) * 2)


def test_a_crash_leaves_no_finished_looking_output_and_resumes(baseline_run, write_job, tmp_path, monkeypatch):
    import rded.distill as distill

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as m:
        m.setattr(distill, "write_contact_sheet", boom)
        out = tmp_path / "crashed"
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_distill(load_job(write_job()), out)
    # only the hidden staging folder, with the committed work, is left
    assert [p.name for p in out.iterdir()] == [".rded-staging"]
    assert run_distill(load_job(write_job()), out, resume=True) is not None
    assert shards_of(out) == shards_of(baseline_run)
    assert (out / "samples.tsv").read_bytes() == (baseline_run / "samples.tsv").read_bytes()
    report = json.loads((out / "report.json").read_text())["checkpoint"]
    assert report["resumed"] and report["units_reused"]["output_shards"] == len(shards_of(out))
    assert "output_shards" not in report["units_computed"]


def test_a_failure_before_any_commit_leaves_nothing(write_job, tmp_path, monkeypatch):
    import rded.distill as distill

    def boom(*args, **kwargs):
        raise RuntimeError("observer on fire")

    monkeypatch.setattr(distill, "key_patches", boom)
    out = tmp_path / "early"
    with pytest.raises(RuntimeError, match="observer on fire"):
        run_distill(load_job(write_job()), out)
    assert list(out.iterdir()) == []


def test_finished_run_is_not_overwritten_without_flag(baseline_run, write_job, capsys):
    rc = main(["distill", str(write_job()), "--out", str(baseline_run)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_class_subset_and_short_classes(write_job, tmp_path):
    # 14 samples per class, subset 8 and ipc 3 need 12 patches: each class is short and makes 2 images
    job = write_job(data={"class_subset": [0, 2]}, distill={"ipc": 3, "slices": [1, 3]})
    run_distill(load_job(job), tmp_path / "sub")
    manifest = json.loads((tmp_path / "sub" / "manifest.json").read_text())
    assert [c["index"] for c in manifest["classes"]] == [0, 2]
    assert all(c["images"] == 2 for c in manifest["classes"])
    report = json.loads((tmp_path / "sub" / "report.json").read_text())
    assert report["accounting"]["excluded_class"] == PER_CLASS
    assert set(report["short_classes"]) == {"circle", "triangle"} or len(report["short_classes"]) == 2


def test_truncated_shard_keeps_what_came_before(write_job, data_dir, tmp_path):
    full = (data_dir / "train-000000.tar").read_bytes()
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes(full[: len(full) // 2 + 700])  # breaks off inside a member
    (tmp_path / "train-000001.tar").write_bytes((data_dir / "train-000001.tar").read_bytes())
    job = write_job("cut.toml", data={"train": str(tmp_path / "train-{000000..000001}.tar"), "broken_shards": "skip"},
                    distill={"subset": 100})
    run_distill(load_job(job), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    acc = report["accounting"]
    assert acc["skipped"]["corrupt_shard"] == 1
    complete_before_cut = len(sample_keys(data_dir / "train-000000.tar")) // 2 - 2
    assert acc["input_samples"] > complete_before_cut + len(sample_keys(data_dir / "train-000001.tar"))
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_manifest_names_torchvision_version_without_importing_it():
    """The manifest's versions must not import torchvision (~160 MB resident) when the job did not."""
    import subprocess
    import sys

    code = ("import sys; from rded.distill import torchvision_version; v = torchvision_version(); "
            "assert 'torchvision' not in sys.modules; import torchvision; assert v == torchvision.__version__, v")
    subprocess.run([sys.executable, "-c", code], check=True)
