"""Malformed and hostile input, from hand-made tars: duplicate keys, strict labels, keys that would break
the ledger, images too large to decode safely, and weights files that carry code."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rded.config import load_job
from rded.distill import run_distill

CLASSES = [{"index": i, "name": n} for i, n in enumerate(("circle", "square", "triangle"))]


def jpeg(seed: int, size=(48, 40)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Members in the given order, PAX format (so names may hold tabs and newlines)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, label: int | bytes, seed: int) -> list[tuple[str, bytes]]:
    cls = label if isinstance(label, bytes) else str(label).encode()
    return [(f"{key}.jpg", jpeg(seed)), (f"{key}.cls", cls)]


def normal(prefix: str, n: int = 6) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in sample(f"{prefix}{i:03d}", i % 3, 100 * ord(prefix[0]) + i)]


def job(tmp_path: Path, data_dir: Path, shards: list[Path], name: str = "job.toml", **runtime) -> Path:
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    train = ", ".join(f'"{s}"' for s in shards)
    rt = "\n".join(f"{k} = {v}" for k, v in {"progress": "false", "batch_size": 8, **runtime}.items())
    path = tmp_path / name
    path.write_text(f'[data]\ntrain = [{train}]\nclasses = "{tmp_path / "classes.json"}"\n'
                    f'[distill]\nipc = 1\nsubset = 100\ncrops = 2\nresolution = 32\n'
                    f'[observer]\nkind = "torchscript"\nweights = "{data_dir / "observer.pt"}"\n'
                    f'[relabel]\nviews = 2\n[runtime]\n{rt}\n')
    return path


def ledger(run: Path) -> list[dict[str, str]]:
    with open(run / "samples.tsv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def provenance_keys(run: Path) -> list[str]:
    keys = []
    for shard in sorted(run.glob("distilled-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    keys += [c["source"]["key"] for c in json.loads(tar.extractfile(m).read())["cells"]]
    return keys


def test_key_repeated_in_consecutive_members_keeps_the_first(tmp_path, data_dir):
    # 3 samples per class, and the repeated key's first copy is class 0's fourth: the four fill its image
    members = normal("n", 9) + sample("dup", 0, 901) + sample("dup", 1, 902)
    shard = write_tar(tmp_path / "a.tar", members)
    run_distill(load_job(job(tmp_path, data_dir, [shard])), tmp_path / "out")
    rows = sorted((r for r in ledger(tmp_path / "out") if r["key"] == "dup"), key=lambda r: int(r["offset"]))
    assert len(rows) == 2  # one row per occurrence: nothing silently merged
    assert rows[0]["status"] in ("distilled", "scored") and rows[1]["status"] == "skipped"
    assert rows[1]["reason"] == "duplicate_key" and rows[0]["offset"] != rows[1]["offset"]
    # the first occurrence (class 0) is the sample: its patch sits in class 0's image
    images = {}
    with tarfile.open(tmp_path / "out" / "distilled-000000.tar") as tar:
        for m in tar:
            if m.name.endswith(".json"):
                meta = json.loads(tar.extractfile(m).read())
                images.update({c["source"]["key"]: meta["class"] for c in meta["cells"]})
    assert images["dup"] == 0
    assert report(tmp_path / "out")["accounting"]["skipped"] == {"duplicate_key": 1}


def test_key_repeated_further_apart_in_a_shard_is_told_apart(tmp_path, data_dir):
    members = sample("dup", 2, 903) + normal("n") + sample("dup", 2, 904)
    shard = write_tar(tmp_path / "a.tar", members)
    run_distill(load_job(job(tmp_path, data_dir, [shard])), tmp_path / "out")
    rows = ledger(tmp_path / "out")
    assert len(rows) == 8
    dup = sorted((r for r in rows if r["key"] == "dup"), key=lambda r: int(r["offset"]))
    assert [r["status"] for r in dup][1] == "skipped" and dup[1]["reason"] == "duplicate_key"
    assert len({(r["key"], r["shard"], r["status"], r["offset"]) for r in dup}) == 2
    assert provenance_keys(tmp_path / "out").count("dup") <= 1


def test_key_in_two_shards_gives_the_same_output_in_any_shard_order(tmp_path, data_dir):
    first = write_tar(tmp_path / "s-000.tar", normal("a") + sample("dup", 1, 905))
    second = write_tar(tmp_path / "s-001.tar", sample("dup", 1, 906) + normal("b"))
    runs = {}
    for order in ("forward", "reverse"):
        shards = [first, second] if order == "forward" else [second, first]
        runs[order] = tmp_path / order
        run_distill(load_job(job(tmp_path, data_dir, shards, f"{order}.toml")), runs[order])
    for name in sorted(p.name for p in runs["forward"].glob("*.tar")):
        assert (runs["forward"] / name).read_bytes() == (runs["reverse"] / name).read_bytes(), name
    for run in runs.values():  # the copy in the shard first by name wins
        (skipped,) = [r for r in ledger(run) if r["reason"] == "duplicate_key"]
        assert skipped["key"] == "dup" and skipped["shard"].endswith("s-001.tar")


@pytest.mark.parametrize("label,reason", [
    (b"0_2", "bad_label"), (b"+1", "bad_label"), (b"1.0", "bad_label"), (b"1 2", "bad_label"),
    ("\uff11".encode(), "bad_label"), (b"", "bad_label"), (b"-1", "unknown_class"), (b" 2\n", None),
])
def test_labels_are_ascii_decimal_digits(tmp_path, data_dir, label, reason):
    shard = write_tar(tmp_path / "a.tar", normal("n") + sample("odd", label, 907))
    run_distill(load_job(job(tmp_path, data_dir, [shard])), tmp_path / "out")
    (row,) = [r for r in ledger(tmp_path / "out") if r["key"] == "odd"]
    if reason is None:  # surrounding ASCII whitespace is allowed: class 2
        assert row["status"] in ("distilled", "scored")
    else:
        assert (row["status"], row["reason"]) == ("skipped", reason)


def test_keys_with_tabs_and_newlines_are_one_row_each(tmp_path, data_dir):
    odd = ["tab\there", "new\nline", "cr\rkey", "back\\slash", "nel\x85sep"]
    members = normal("n", 9) + [m for i, k in enumerate(odd) for m in sample(k, i % 3, 910 + i)]
    shard = write_tar(tmp_path / "a.tar", members)
    run_distill(load_job(job(tmp_path, data_dir, [shard])), tmp_path / "out")
    rows = ledger(tmp_path / "out")
    assert len(rows) == 9 + len(odd)  # 14 samples, 14 rows
    assert len((tmp_path / "out" / "samples.tsv").read_text(encoding="utf-8").splitlines()) == 1 + 9 + len(odd)
    assert {r["key"] for r in rows} >= {"tab\\there", "new\\nline", "cr\\rkey", "back\\\\slash", "nel\\x85sep"}


def big_png(side: int = 13_000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side), 1).save(buf, format="PNG")  # about 20 KB, 169 Mpx once decoded
    return buf.getvalue()


def run_in_subprocess(job_path: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rded", "distill", str(job_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return report(out)


def test_decode_memory_is_bounded_by_configuration(tmp_path, data_dir):
    png = big_png()
    members = normal("n") + [m for i in range(3) for m in [(f"big{i}.png", png), (f"big{i}.cls", b"0")]]
    shard = write_tar(tmp_path / "a.tar", members)
    # the defaults (40 Mpx per image): the three 169-Mpx images are skipped from their headers, never decoded
    default = run_in_subprocess(job(tmp_path, data_dir, [shard], batch_size=16), tmp_path / "default")
    assert default["accounting"]["skipped"] == {"too_large": 3}
    assert default["peak_rss_mib"] < 1500
    assert {r["key"] for r in ledger(tmp_path / "default") if r["reason"] == "too_large"} == {"big0", "big1", "big2"}
    # allowed: a decode batch of at most 170 Mpx holds one of them at a time, against all three at once
    # when the batch is bounded by count alone (16); the same images are distilled either way
    runs = {}
    for name, budget in (("one", 170_000_000), ("three", 600_000_000)):
        path = job(tmp_path, data_dir, [shard], f"{name}.toml", batch_size=16, max_pixels=170_000_000,
                   max_batch_pixels=budget)
        runs[name] = run_in_subprocess(path, tmp_path / name)
        assert runs[name]["accounting"]["skipped"] == {}
    assert runs["one"]["peak_rss_mib"] < runs["three"]["peak_rss_mib"] - 500
    for shard_file in sorted((tmp_path / "one").glob("*.tar")):
        assert shard_file.read_bytes() == (tmp_path / "three" / shard_file.name).read_bytes()


class FileMaker:
    """A pickle payload: unpickling it creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("observer", [
    {"kind": "efficientnet-lite0"},
    {"kind": "torchvision", "arch": "resnet18", "num_outputs": 3},
    {"kind": "torchscript"},
])
def test_weights_carrying_code_are_refused_for_every_observer_kind(tmp_path, data_dir, observer):
    import torch

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pt"
    torch.save({"conv1.weight": FileMaker(str(marker))}, weights)
    shard = write_tar(tmp_path / "a.tar", normal("n"))
    path = job(tmp_path, data_dir, [shard])
    text = path.read_text().replace(f'kind = "torchscript"\nweights = "{data_dir / "observer.pt"}"',
                                    "\n".join(f"{k} = {json.dumps(v)}" for k, v in observer.items())
                                    + f'\nweights = "{weights}"')
    path.write_text(text)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    proc = subprocess.run([sys.executable, "-m", "rded", "distill", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "observer.weights" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()
