"""Tiny data made on the spot: a few synthetic classes as shards, and an untrained TorchScript observer
(its scores are arbitrary but deterministic, which is all the job's contracts need)."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from rded.synthetic import SmallCNN, save_torchscript, save_weights, write_synthetic_shards

NUM_CLASSES = 3
PER_CLASS = 14
BAD = {"undecodable": 1, "missing_label": 1, "unknown_class": 1, "bad_label": 1}
SHARED_IMAGEWOOF = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagewoof"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_synthetic_shards(out, num_classes=NUM_CLASSES, per_class=PER_CLASS, num_shards=2, seed=0,
                           size_range=(40, 72), bad_samples=BAD)
    torch.manual_seed(0)
    save_torchscript(SmallCNN(NUM_CLASSES, width=8).eval(), out / "observer.pt")
    torch.manual_seed(1)  # the same architecture as a state dict (kind small-cnn): its BN layers can be hooked
    save_weights(SmallCNN(NUM_CLASSES, width=8), out / "observer-state.pt")
    return out


def job_text(data_dir: Path, **sections: dict) -> str:
    """A job file for the tiny data; `sections` override or add keys per section."""
    base = {
        "data": {"train": str(data_dir / "train-{000000..000001}.tar"), "classes": str(data_dir / "classes.json")},
        "distill": {"ipc": 2, "slices": [1, 2], "subset": 8, "crops": 3, "factor": 2, "resolution": 32},
        "observer": {"kind": "torchscript", "weights": str(data_dir / "observer.pt")},
        "relabel": {"views": 3},
        "runtime": {"batch_size": 8, "dali_threads": 1, "progress": False},
        "output": {"shard_size": 4},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


@pytest.fixture(scope="session")
def val_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("val")
    write_synthetic_shards(out, num_classes=NUM_CLASSES, per_class=7, num_shards=3, seed=5, size_range=(40, 60),
                           prefix="val")
    return out


@pytest.fixture
def write_job(tmp_path, data_dir):
    def make(name: str = "job.toml", **sections) -> Path:
        path = tmp_path / name
        path.write_text(job_text(data_dir, **sections))
        return path
    return make


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, data_dir) -> Path:
    """One finished run of the default tiny job, shared by read-only tests."""
    from rded.config import load_job
    from rded.distill import run_distill

    tmp = tmp_path_factory.mktemp("baseline")
    job = tmp / "job.toml"
    job.write_text(job_text(data_dir))
    run_distill(load_job(job), tmp / "out")
    return tmp / "out"


def compute_of(job):
    """The precision policy a run of `job` uses on this machine (for brute-force recomputations)."""
    from rded.runtime import ComputePolicy, resolve_devices

    return ComputePolicy.resolve(resolve_devices(job.runtime.device, job.runtime.decoder)[0], job.runtime.precision)


def sample_keys(shard: Path) -> list[str]:
    """Keys of a shard's samples, by WebDataset's grouping rule (brute force, independent of rded)."""
    keys: list[str] = []
    with tarfile.open(shard) as tar:
        for m in tar:
            key = m.name.split("/")[-1].split(".", 1)[0]
            key = "/".join(m.name.split("/")[:-1] + [key])
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
