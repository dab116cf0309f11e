"""Soft labels: stored views and labels reproduce the observer, the loader applies them exactly, and the
shards read with numpy + zstandard alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NUM_CLASSES, compute_of
from rded.cli import main
from rded.config import load_job
from rded.errors import JobError
from rded.labels import (LABELS_FORMAT, LABELS_FORMAT_V1, LABELS_MEMBER, decode_arrays, decode_image_labels,
                         decode_records, encode_image_labels, encode_records, image_tail, kl_divergence, pack_labels,
                         region_dtype, softmax, unpack_logits, view_dtype)
from rded.geometry import apply_view, decode_distilled, draw_view, shuffle_grid
from rded.loader import DistilledDataset, stored_view


def random_log_probs(n: int, c: int, seed: int = 0) -> np.ndarray:
    """Views of one "image": a shared class profile plus per-view noise and sharpness."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 3, c)
    logits = base[None] * rng.uniform(0.5, 2, (n, 1)) + rng.normal(0, 1, (n, c))
    return torch.log_softmax(torch.tensor(logits, dtype=torch.float32), 1).numpy()


def test_codec_all_classes_is_exact_in_both_versions():
    lp = random_log_probs(50, 40)
    for version in (1, 2):
        full = np.zeros(50, region_dtype(40, 40, version))
        assert full.dtype.names == ("cell", "logit")
        pack_labels(full, lp)
        assert np.array_equal(full["logit"], (lp - lp.max(1, keepdims=True)).astype(np.float16))
        assert kl_divergence(unpack_logits(full, 40), lp, 1.0).max() < 1e-4


def test_codec_v1_records_still_decode():
    lp = random_log_probs(50, 40)
    top = np.zeros(50, region_dtype(40, 8, version=1))
    assert top.dtype.names == ("cell", "index", "logit", "rest")
    pack_labels(top, lp)
    rec = softmax(unpack_logits(top, 40))
    exact = softmax(lp)
    # the top classes keep their probability; the rest share the remaining mass evenly
    idx = top["index"].astype(int)
    assert np.allclose(np.take_along_axis(rec, idx, 1), np.take_along_axis(exact, idx, 1), atol=2e-3)
    assert np.allclose(rec.sum(1), 1.0, atol=1e-5)
    assert (np.argsort(-exact, 1)[:, :8] == idx).all()
    for row, i in zip(unpack_logits(top, 40), range(50)):  # every other class gets `rest`
        others = np.setdiff1d(np.arange(40), idx[i])
        assert np.all(row[others] == np.float32(top["rest"][i]))


@pytest.mark.parametrize("rank", [0, 1])
def test_codec_v2_round_trip_is_the_documented_reconstruction(rank):
    c, k = 40, 6
    lp = random_log_probs(60, c)
    views, regions = lp[:56], lp[56:]
    tail = image_tail(views, regions, rank=rank)
    assert tail.shape == (1 + rank, c) and tail.dtype == np.float16
    # row 0: the mean of every label's shifted log-probabilities, shifted to a largest of 0, rounded to 1/8
    shifted = lp.astype(np.float64) - lp.max(1, keepdims=True)
    mean = shifted.mean(0)
    assert np.array_equal(tail[0], (np.round((mean - mean.max()) * 8) / 8).astype(np.float16))
    if rank:  # row 1: the leading principal direction, scaled to its standard deviation, rounded to 1/16
        eigval, eigvec = np.linalg.eigh((shifted - mean).T @ (shifted - mean) / len(shifted))
        d = eigvec[:, -1] * np.sqrt(eigval[-1])
        d = d if d[np.argmax(np.abs(d))] > 0 else -d
        assert np.abs(tail[1].astype(np.float64) - d).max() <= 1 / 32 + 1e-3
    rec = np.zeros(56, view_dtype(2, c, k, tail_rank=rank))
    pack_labels(rec, views, tail)
    stored = unpack_logits(rec, c, tail)
    basis = tail.astype(np.float64)
    for i in range(56):  # brute force, class by class, from the record's fields alone
        index = [int(j) for j in rec["index"][i]]
        s = shifted[i]
        assert index == sorted(range(c), key=lambda j: (-s[j], j))[:k]
        others = [j for j in range(c) if j not in index]
        assert np.isclose(float(rec["rest"][i]), np.log(sum(np.exp(s[j]) for j in others)), atol=1 / 64 + 2e-3)
        coef = rec["coef"][i].astype(np.float64)
        shape = [sum(coef[r] * basis[r, j] for r in range(1 + rank)) for j in range(c)]
        norm = np.log(sum(np.exp(shape[j]) for j in others))
        want = np.empty(c)
        level = 0
        for pos, j in enumerate(index):
            level += int(rec["gap"][i][pos])
            want[j] = -level / 16
            assert abs(want[j] - s[j]) <= 1 / 32 + 1e-9
        for j in others:
            want[j] = float(rec["rest"][i]) + shape[j] - norm
        assert np.allclose(stored[i], want, atol=1e-4, rtol=1e-5)
        # coef: least squares (with an intercept) of the label's tail on the basis, by the normal equations
        a = np.array([[1.0, *basis[:, j]] for j in others])
        fit = np.linalg.solve(a.T @ a, a.T @ s[others])[1:]
        assert np.all(np.abs(coef - fit) <= 1 / 256 + 1e-3 * np.maximum(1.0, np.abs(fit)))
    # the stored labels carry the remaining mass exactly (up to f2) and beat v1 on structured tails
    assert np.allclose(softmax(stored).sum(1), 1.0, atol=1e-5)
    v1 = np.zeros(56, view_dtype(2, c, k, version=1))
    pack_labels(v1, views)
    for t in (1.0, 20.0):
        assert kl_divergence(stored, views, t).mean() < 0.5 * kl_divergence(unpack_logits(v1, c), views, t).mean()
    with pytest.raises(ValueError):
        unpack_logits(rec, c)
    assert np.array_equal(decode_records(encode_records(rec)), rec)
    back = decode_arrays(encode_records(rec, tail))
    assert len(back) == 2 and np.array_equal(back[0], rec) and np.array_equal(back[1], tail)
    # an image's member: columns back to the same records, tail included
    regions = np.zeros(4, region_dtype(c, k, tail_rank=1))
    regions["cell"] = np.arange(4)
    pack_labels(regions, views[:4], tail)
    got_views, got_regions, got_tail = decode_image_labels(encode_image_labels(rec, regions, tail))
    assert got_views.dtype == rec.dtype and np.array_equal(got_views, rec)
    assert got_regions.dtype == regions.dtype and np.array_equal(got_regions, regions)
    assert np.array_equal(got_tail, tail)
    assert decode_image_labels(encode_image_labels(rec, regions))[2] is None
    with pytest.raises(ValueError, match="one-field columns"):
        decode_image_labels(encode_records(rec))
    views_only = [a for a in decode_arrays(encode_image_labels(rec, regions)) if a.dtype.names[0].startswith("views.")]
    with pytest.raises(ValueError, match="regions: no columns"):
        decode_image_labels(encode_records(*views_only))


def test_views_are_pure_and_shuffle_is_a_permutation():
    assert draw_view(0, "k", 3, 64, 2) == draw_view(0, "k", 3, 64, 2)
    assert len({draw_view(0, "k", v, 64, 2) for v in range(30)}) > 20
    img = torch.arange(3 * 9 * 9, dtype=torch.int32).view(3, 9, 9)
    out = shuffle_grid(img, (1, 0), (1, 0))  # 9 px, factor 2: strips of 5 and 4
    assert torch.equal(out[:, :4, :4], img[:, 5:, 5:]) and torch.equal(out[:, 4:, 4:], img[:, :5, :5])
    assert sorted(out.flatten().tolist()) == sorted(img.flatten().tolist())
    for v in range(200):
        x, y, w, h = draw_view(1, "q", v, 64, 2).crop
        assert 0 <= x and x + w <= 64 and 0 <= y and y + h <= 64
        assert w * h >= 0.5 * 64 * 64 * 0.95  # scale >= 1/factor, up to rounding


def test_loader_image_is_the_recorded_view_and_label_is_the_observer(baseline_run, write_job):
    from rded.observer import build_observer
    from rded.score import Scorer
    from rded.source import load_classes

    job = load_job(write_job())
    ds = DistilledDataset(baseline_run, temperature=20.0, normalize=False)
    assert len(ds) == NUM_CLASSES * 2
    obs = build_observer(job, load_classes(job), compute_of(job))
    scorer = Scorer(obs, mode="pad", resolution=32, score_batch=job.runtime.score_batch, decimals=4)
    for epoch in range(4):  # 3 stored views: epoch 3 wraps to view 0
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, target = ds[i]
            record = ds.view_record(i)
            expected_view = draw_view(0, ds.keys[i], epoch % 3, 32, 2)
            assert stored_view(record) == expected_view
            expected = apply_view(decode_distilled(ds.images[i]), expected_view, 32)
            assert torch.equal(image, expected)
            exact = scorer.log_probs(expected.permute(1, 2, 0)[None]).numpy()
            stored = unpack_logits(record[None], NUM_CLASSES)
            assert kl_divergence(stored, exact, 20.0)[0] < 1e-3 and kl_divergence(stored, exact, 1.0)[0] < 1e-3
            assert np.abs(target.numpy() - softmax(exact, 20.0)[0]).max() < 1e-3
            assert abs(target.sum().item() - 1) < 1e-5


def test_loader_works_with_dataloader_workers(baseline_run):
    ds = DistilledDataset(baseline_run, temperature=4.0)
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=2)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert torch.allclose(targets[0], ds[0][1])
    assert torch.equal(images[1], ds[1][0])


def test_slice_loader_yields_exactly_the_slice(baseline_run, tmp_path):
    assert main(["slice", str(baseline_run), "--ipc", "1", "--out", str(tmp_path / "s1")]) == 0
    full = DistilledDataset(baseline_run, normalize=False)
    part = DistilledDataset(tmp_path / "s1", normalize=False)
    assert part.keys == [f"{c:05d}_0000" for c in range(NUM_CLASSES)]
    for i, key in enumerate(part.keys):
        j = full.keys.index(key)
        assert torch.equal(part[i][0], full[j][0]) and torch.equal(part[i][1], full[j][1])
    assert sorted(p.name for p in (tmp_path / "s1").glob("labels-*.tar")) == ["labels-000000.tar"]


def test_manifest_records_label_size_and_fidelity(baseline_run):
    labels = json.loads((baseline_run / "manifest.json").read_text())["labels"]
    on_disk = sum(p.stat().st_size for p in baseline_run.glob("labels-*.tar"))
    assert labels["bytes"] == on_disk and labels["views"] == 3 and labels["classes"] == NUM_CLASSES
    assert 0 <= labels["mean_kl_t20"] < 1e-3 and 0 <= labels["mean_kl_t1"] < 1e-3


READER = r'''
import io, sys, tarfile, numpy as np, zstandard
assert "rded" not in sys.modules
path = sys.argv[1]
with tarfile.open(path) as tar:
    for m in tar:
        raw = zstandard.ZstdDecompressor().decompress(tar.extractfile(m).read())
        f, columns = io.BytesIO(raw), {}
        while f.tell() < len(raw):  # one-field columns: views.<field>, regions.<field>
            a = np.load(f, allow_pickle=False)
            columns[a.dtype.names[0]] = a[a.dtype.names[0]]
        assert m.name.endswith(".labels.npy.zst")
        assert set(columns) >= {"views." + n for n in ("col_perm", "row_perm", "crop", "flip", "logit")}
        logits = columns["views.logit"].astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
        print(m.name, logits.shape[0], p.shape[1], round(float(p.sum(1).mean()), 6))
    assert "rded" not in sys.modules
'''


def test_label_shards_read_with_numpy_and_zstandard_alone(baseline_run):
    proc = subprocess.run([sys.executable, "-c", READER, str(baseline_run / "labels-000000.tar")],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0].split()[1:] == ["3", str(NUM_CLASSES), "1.0"]


def test_random_baseline_run_is_whole_images_in_draw_order(write_job, tmp_path):
    from rded.distill import run_distill
    from rded.records import SampleRef, draw_order

    job = load_job(write_job(distill={"method": "random", "factor": 1, "crops": 1, "subset": 2, "ipc": 2}))
    run_distill(job, tmp_path / "rand")
    ds = DistilledDataset(tmp_path / "rand", normalize=False)
    assert len(ds) == NUM_CLASSES * 2 and ds[0][0].shape == (3, 32, 32)
    manifest = json.loads((tmp_path / "rand" / "manifest.json").read_text())
    for key in ds.keys:  # each image is one whole source image, its largest centred square
        meta = json.loads(read_member_json(tmp_path / "rand", manifest, key))
        (cell,) = meta["cells"]
        w, h = cell["source"]["image_size"]
        assert cell["source"]["window"][2] == min(w, h)
    # image 0 of each class is the first in draw order, so slices of a random run are random too
    ranks = {}
    for key in ds.keys:
        meta = json.loads(read_member_json(tmp_path / "rand", manifest, key))
        ranks[(meta["class"], meta["image_index"])] = draw_order(0, SampleRef(meta["cells"][0]["source"]["key"],
                                                                                0, 0, 0, 0))
    for c in range(NUM_CLASSES):
        assert ranks[(c, 0)] < ranks[(c, 1)]


@pytest.mark.parametrize("relabel, grid, scale", [
    ({"view_grid": 2}, 2, (0.5, 1.0)),  # RDED's views on whole images (DD-Ranking's random baseline)
    ({"view_scale": [0.08, 1.0]}, 1, (0.08, 1.0)),  # ImageNet's RandomResizedCrop, no shuffle
])
def test_random_baseline_views_follow_the_view_settings(write_job, tmp_path, relabel, grid, scale):
    from rded.observer import build_observer
    from rded.score import Scorer
    from rded.source import load_classes

    path = write_job(distill={"method": "random", "factor": 1, "crops": 1, "subset": 2, "ipc": 2},
                     relabel={"views": 3, **relabel})
    job = load_job(path)
    assert (job.view_grid, job.view_scale) == (grid, scale)
    from rded.distill import run_distill

    run_distill_to = tmp_path / "rand"
    run_distill(job, run_distill_to)
    manifest = json.loads((run_distill_to / "manifest.json").read_text())
    assert {k: manifest["job"]["relabel"][k] for k in relabel} == relabel
    ds = DistilledDataset(run_distill_to, temperature=20.0, normalize=False)
    scorer = Scorer(build_observer(job, load_classes(job), compute_of(job)), mode="pad", resolution=32,
                    score_batch=job.runtime.score_batch, decimals=4)
    areas, shuffled = [], 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, target = ds[i]
            view = draw_view(0, ds.keys[i], epoch, 32, grid, scale)
            assert stored_view(ds.view_record(i)) == view and len(view.col_perm) == grid
            expected = apply_view(decode_distilled(ds.images[i]), view, 32)
            assert torch.equal(image, expected)
            exact = scorer.log_probs(expected.permute(1, 2, 0)[None]).numpy()
            assert np.abs(target.numpy() - softmax(exact, 20.0)[0]).max() < 1e-3
            areas.append(view.crop[2] * view.crop[3] / 32 ** 2)
            shuffled += view.col_perm != tuple(range(grid)) or view.row_perm != tuple(range(grid))
    assert min(areas) >= scale[0] * 0.9 and max(areas) <= 1.0
    assert min(areas) < 0.5 if scale[0] < 0.5 else min(areas) >= 0.45
    assert (shuffled > 0) == (grid > 1)
    from rded.export import export_run  # the arrays export names the view's own grid, not the stitching's

    export_run(run_distill_to, "arrays", tmp_path / "arrays")
    columns = json.loads((tmp_path / "arrays" / "export.json").read_text())["members"]["views.npy"]["columns"]
    assert columns[:2 * grid] == [f"col_perm[{i}]" for i in range(grid)] + [f"row_perm[{i}]" for i in range(grid)]


def test_view_settings_are_checked_and_recorded_only_when_set(write_job, baseline_run):
    with pytest.raises(JobError, match="view_scale"):
        load_job(write_job(relabel={"view_scale": [0.6, 0.5]}))
    with pytest.raises(JobError, match="view_grid"):
        load_job(write_job(relabel={"view_grid": 0}))
    relabel = json.loads((baseline_run / "manifest.json").read_text())["job"]["relabel"]
    assert "view_grid" not in relabel and "view_scale" not in relabel  # the authors' views: as always recorded


def read_member_json(run, manifest, key):
    from rded.tario import read_samples

    for s in manifest["shards"]:
        samples = read_samples((run / s["name"]).read_bytes(), s["name"])
        if key in samples:
            return samples[key]["json"]
    raise KeyError(key)


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, data_dir) -> Path:
    """A run whose labels are partial (topk 2 < 3 classes): v2 records with a per-image tail."""
    from conftest import job_text
    from rded.distill import run_distill

    tmp = tmp_path_factory.mktemp("topk")
    (tmp / "job.toml").write_text(job_text(data_dir, relabel={"views": 3, "topk": 2, "exact_classes": 0,
                                                                   "tail_rank": 1}))
    run_distill(load_job(tmp / "job.toml"), tmp / "out")
    return tmp / "out"


def exact_labels(run: Path):
    """Per key: the observer's exact log-probabilities of the stored views and regions, recomputed."""
    from rded.observer import build_observer
    from rded.relabel import Relabeler
    from rded.score import Scorer
    from rded.source import load_classes

    job = load_job(run.parent / "job.toml")
    obs = build_observer(job, load_classes(job), compute_of(job))
    scorer = Scorer(obs, mode=job.distill.score_mode, resolution=32, score_batch=job.runtime.score_batch, decimals=4)
    relabeler = Relabeler(scorer, seed=0, views=3, resolution=32, factor=2, topk=job.relabel.topk,
                          tail_rank=job.relabel.tail_rank)
    ds = DistilledDataset(run, normalize=False)
    return ds, {key: relabeler.exact(key, ds.images[i])[1:] for i, key in enumerate(ds.keys)}


def test_v2_run_fidelity_in_manifest_matches_a_recomputation(topk_run):
    from conftest import tar_members

    manifest = json.loads((topk_run / "manifest.json").read_text())
    labels = manifest["labels"]
    assert labels["format"] == LABELS_FORMAT and labels["topk"] == 2 and labels["classes"] == NUM_CLASSES
    ds, exact = exact_labels(topk_run)
    members = {}
    for shard in manifest["shards"]:
        members.update(tar_members(topk_run / shard["labels"]["name"]))
    kl = {1.0: 0.0, 20.0: 0.0}
    count = 0
    for i, key in enumerate(ds.keys):
        view_lp, region_lp = exact[key]
        views, regions, tail = decode_image_labels(members[f"{key}.{LABELS_MEMBER}"])
        assert set(views.dtype.names) >= {"index", "gap", "rest", "coef"} and tail.dtype == np.float16
        assert views.dtype["crop"].base == np.uint8  # S <= 255
        assert np.array_equal(tail, image_tail(view_lp, region_lp, rank=1))
        stored = np.concatenate([unpack_logits(views, NUM_CLASSES, tail), unpack_logits(regions, NUM_CLASSES, tail)])
        both = np.concatenate([view_lp, region_lp])
        for t in kl:
            kl[t] += kl_divergence(stored, both, t).sum()
        count += len(both)
        for epoch in range(3):  # the loader's label is the decoded v2 record
            ds.set_epoch(epoch)
            assert np.allclose(ds[i][1].numpy(), softmax(stored[epoch:epoch + 1], 1.0)[0], atol=1e-6)
    assert labels["mean_kl_t1"] == float(f"{kl[1.0] / count:.3e}")
    assert labels["mean_kl_t20"] == float(f"{kl[20.0] / count:.3e}")
    assert labels["mean_kl_t1"] > 0  # partial labels: not exact


def test_loader_reads_a_v1_run(topk_run, tmp_path):
    """A run written by the previous version (rded-soft-labels/1: no tail, `rest` spread evenly)."""
    from conftest import copy_tree
    from rded.tario import read_samples, write_tar

    run = copy_tree(topk_run, tmp_path / "v1")
    manifest = json.loads((run / "manifest.json").read_text())
    expected = {}
    for shard in manifest["shards"]:
        path = run / shard["labels"]["name"]
        samples = read_samples(path.read_bytes(), path.name)
        out = []
        for key, members in samples.items():
            v2, regions, tail = decode_image_labels(members[LABELS_MEMBER])
            v1 = np.zeros(len(v2), view_dtype(2, NUM_CLASSES, 2, version=1))
            v1["view"] = np.arange(len(v2))
            for f in ("col_perm", "row_perm", "crop", "flip"):
                v1[f] = v2[f]
            pack_labels(v1, unpack_logits(v2, NUM_CLASSES, tail))
            expected[key] = unpack_logits(v1, NUM_CLASSES)
            r1 = np.zeros(len(regions), region_dtype(NUM_CLASSES, 2, version=1))
            r1["cell"] = regions["cell"]
            pack_labels(r1, unpack_logits(regions, NUM_CLASSES, tail))
            out.append((key, {"views.npy.zst": encode_records(v1), "regions.npy.zst": encode_records(r1)}))
        shard["labels"]["sha256"] = write_tar(path, out)
        shard["labels"]["bytes"] = path.stat().st_size
    manifest["labels"]["format"] = LABELS_FORMAT_V1
    (run / "manifest.json").write_text(json.dumps(manifest))
    ds = DistilledDataset(run, temperature=4.0, normalize=False)
    new = DistilledDataset(topk_run, temperature=4.0, normalize=False)
    assert ds.keys == new.keys
    for epoch in range(3):
        ds.set_epoch(epoch)
        new.set_epoch(epoch)
        for i, key in enumerate(ds.keys):
            image, target = ds[i]
            assert torch.equal(image, new[i][0])
            assert np.allclose(target.numpy(), softmax(expected[key][epoch:epoch + 1], 4.0)[0], atol=1e-6)
    manifest["labels"]["format"] = "rded-soft-labels/9"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="soft-labels/9"):
        DistilledDataset(run)


def test_shards_readme_decoder_reads_v2_labels_with_numpy_and_zstandard_alone(topk_run, tmp_path):
    """The reading snippet in shards/README.md, run as written (numpy and zstandard only), decodes v2 labels
    exactly as the loader does."""
    readme = (Path(__file__).resolve().parents[1] / "shards" / "README.md").read_text()
    snippet = readme.split("Reading needs only numpy and zstandard:\n\n```python\n", 1)[1].split("```", 1)[0]
    ds = DistilledDataset(topk_run, normalize=False)
    key = ds.keys[0]
    assert 'key, C = "00003_0000", 1000' in snippet
    code = ("import sys\n" + snippet.replace('key, C = "00003_0000", 1000', f'key, C = "{key}", {NUM_CLASSES}')
            + "\nassert 'rded' not in sys.modules and tail is not None\nnp.save(sys.argv[1], view_logits)\n")
    out = tmp_path / "logits.npy"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120,
                          cwd=topk_run)
    assert proc.returncode == 0, proc.stderr
    got = np.load(out)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert np.allclose(got[epoch], ds.view_logits(0)[0], atol=1e-5)


def test_v2_labels_rerun_byte_identical(topk_run, tmp_path):
    """Partial labels (the SVD tail basis, least-squares coefficients) are as reproducible as exact ones."""
    from rded.distill import run_distill

    run_distill(load_job(topk_run.parent / "job.toml"), tmp_path / "again")
    first = json.loads((topk_run / "manifest.json").read_text())["shards"]
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())["shards"]
    assert [s["labels"]["sha256"] for s in again] == [s["labels"]["sha256"] for s in first]
    assert [s["sha256"] for s in again] == [s["sha256"] for s in first]
