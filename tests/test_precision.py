"""One precision and layout policy (runtime.precision) for every model call: what `auto` picks, that every
observer and student call runs under it, and that bf16 keeps the determinism contracts fp32 has."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tar_members
from rded.cli import main
from rded.config import load_job
from rded.distill import run_distill
from rded.normalization import IMAGENET
from rded.observer import REGISTRY, register
from rded.runtime import ComputePolicy, native_bf16, resolve_precision
from rded.synthetic import SmallCNN


def run_files(out: Path) -> dict[str, bytes]:
    """Every file of a finished run whose bytes the determinism contract covers."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.suffix == ".tar" or p.name in ("manifest.json", "samples.tsv")}


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                         (False, False, "fp32")])
def test_auto_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) == (expected == "bf16")
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reruns_batch_size_threads_and_shard_order_give_identical_runs(write_job, data_dir, tmp_path, precision):
    """The fp32 contract, for each precision: a rerun, another decode batch size and thread count, and the
    shards listed in another order give the same image shards, label shards, manifest and ledger."""
    runtime = {"precision": precision, "progress": False}
    first = run_distill(load_job(write_job("a.toml", runtime={**runtime, "batch_size": 8})), tmp_path / "a")
    run_distill(load_job(write_job("b.toml", runtime={**runtime, "batch_size": 8})), tmp_path / "b")
    run_distill(load_job(write_job("c.toml", runtime={**runtime, "batch_size": 3, "dali_threads": 2})), tmp_path / "c")
    a, b, c = (run_files(tmp_path / d) for d in "abc")
    assert first.images == 6 and any(n.startswith("labels-") for n in a)
    assert a == b
    # the job files differ in runtime.batch_size, which the manifest records; everything else is identical
    assert {n: v for n, v in a.items() if n != "manifest.json"} == {n: v for n, v in c.items() if n != "manifest.json"}
    reversed_order = [str(data_dir / "train-000001.tar"), str(data_dir / "train-000000.tar")]
    run_distill(load_job(write_job("rev.toml", runtime=runtime, data={"train": reversed_order})), tmp_path / "rev")
    rev = run_files(tmp_path / "rev")
    for name in a:  # provenance in the images' json names the shards as the job lists them: compare pixels, labels
        if name.endswith(".tar"):
            ma, mr = tar_members(tmp_path / "a" / name), tar_members(tmp_path / "rev" / name)
            assert {k: v for k, v in ma.items() if not k.endswith(".json")} == \
                   {k: v for k, v in mr.items() if not k.endswith(".json")}
    manifest = json.loads(a["manifest.json"])
    assert manifest["precision"] == precision and manifest["job"]["runtime"]["precision"] == precision
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["compute"] == {"device": "cpu", "precision": precision, "memory_format": "channels_last"}


def test_bf16_and_fp32_differ_only_slightly(data_dir):
    """bf16 is really used (scores move), and it stays close to fp32 on the same patches."""
    from rded.observer import build_observer
    from rded.score import Scorer

    from test_observer import job_for

    job = job_for(data_dir, {"kind": "torchscript", "weights": str(data_dir / "observer.pt")})
    patches = np.random.default_rng(3).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    lp = {p: Scorer(build_observer(job, None, ComputePolicy(torch.device("cpu"), p)), mode="pad", resolution=32,
                    score_batch=8, decimals=4).log_probs(patches) for p in ("fp32", "bf16")}
    diff = (lp["fp32"] - lp["bf16"]).abs()
    assert lp["bf16"].dtype == torch.float32
    assert diff.max() > 0 and diff.max() < 0.1


class CallLog:
    """A forward pre-hook that records, for each call, whether bf16 autocast was on and the input's layout."""

    def __init__(self):
        self.calls: list[tuple[bool, bool]] = []

    def __call__(self, module, inputs):
        x = inputs[0]
        self.calls.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16,
                           x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] > 1))


@pytest.fixture
def logged_observer():
    """An observer kind whose every call is logged (a SmallCNN with BN layers, so refinement can use it)."""
    log = CallLog()

    @register("logged-cnn-test", normalization=IMAGENET, input_size=32)
    def logged_cnn(cfg, weights):
        torch.manual_seed(0)
        model = SmallCNN(cfg.num_outputs or 3, width=8)
        model.register_forward_pre_hook(log)
        return model

    yield log
    del REGISTRY["logged-cnn-test"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_observer_call_of_a_job_runs_under_the_policy(write_job, tmp_path, logged_observer, precision):
    """Scoring, refinement and relabelling: every call of the observer is bf16 autocast exactly when the job
    says bf16, always on a channels-last batch."""
    job = write_job(observer={"kind": "logged-cnn-test", "num_outputs": 3},
                    refine={"enabled": True, "iterations": 2, "resolutions": [32], "jitter": 2},
                    runtime={"precision": precision, "progress": False})
    run_distill(load_job(job), tmp_path / "out")
    assert len(logged_observer.calls) > 10
    assert {bf16 for bf16, _ in logged_observer.calls} == {precision == "bf16"}
    # the one-image probe at load time aside, every batch is channels-last
    assert sum(1 for _, cl in logged_observer.calls if not cl) == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_student_training_evaluation_and_online_teacher_run_under_the_policy(
        write_job, tmp_path, logged_observer, monkeypatch, val_dir, precision):
    """`rded eval --precision`: the student's forward passes in training and evaluation, and the online
    teacher's, all under the policy; the result records it."""
    import rded.train

    run_distill(load_job(write_job("job.toml", observer={"kind": "logged-cnn-test", "num_outputs": 3},
                                   runtime={"precision": "fp32", "progress": False})), tmp_path / "run")
    logged_observer.calls.clear()
    student_log = CallLog()
    build = rded.train.build_student

    def logged_student(name, num_classes):
        model = build(name, num_classes)
        model.register_forward_pre_hook(student_log)
        return model

    monkeypatch.setattr(rded.train, "build_student", logged_student)
    out = tmp_path / "eval.json"
    assert main(["eval", "--distilled", str(tmp_path / "run"), "--val", str(val_dir / "val-000000.tar"),
                 "--student", "resnet18", "--epochs", "2", "--resolution", "32", "--workers", "0", "--quiet",
                 "--teacher-online", "--job", str(tmp_path / "job.toml"), "--precision", precision,
                 "--out", str(out)]) == 0
    bf16 = precision == "bf16"
    assert student_log.calls and {a for a, _ in student_log.calls} == {bf16}
    assert logged_observer.calls and {a for a, _ in logged_observer.calls} == {bf16}
    assert all(cl for _, cl in student_log.calls)
    assert json.loads(out.read_text())["compute"]["precision"] == precision


def test_the_replaced_amp_key_is_refused_naming_its_replacement(write_job, tmp_path, capsys):
    job = write_job(refine={"enabled": True, "amp": True})
    assert main(["distill", str(job), "--out", str(tmp_path / "o")]) == 2
    assert "refine.amp was replaced by runtime.precision" in capsys.readouterr().err


def test_a_state_dict_saved_from_channels_last_training_loads_contiguous(tmp_path):
    from rded.train import save_student

    model = ComputePolicy(torch.device("cpu"), "bf16").prepare(SmallCNN(3, width=8))
    save_student(model, tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(v.is_contiguous() and v.dtype in (torch.float32, torch.int64) for v in state.values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_auto_refines_in_fp32_on_the_cpu_and_scores_in_bf16(write_job, tmp_path, logged_observer, monkeypatch):
    """Where bf16 loses (refinement's backward pass on the CPU), `auto` keeps fp32 for it; scoring and
    relabelling (no gradient) run bf16. The manifest says which precision refined."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # auto = bf16 on any CPU
    seen: list[tuple[bool, bool]] = []
    logged_observer.calls = seen
    hook_call = CallLog.__call__

    def with_grad(self, module, inputs):
        hook_call(self, module, inputs)
        seen[-1] = (seen[-1][0], torch.is_grad_enabled())

    monkeypatch.setattr(CallLog, "__call__", with_grad)
    job = write_job(observer={"kind": "logged-cnn-test", "num_outputs": 3},
                    refine={"enabled": True, "iterations": 2, "resolutions": [32], "jitter": 2},
                    runtime={"precision": "auto", "progress": False})
    run_distill(load_job(job), tmp_path / "out")
    refine_calls = [bf16 for bf16, grad in seen if grad]
    other_calls = [bf16 for bf16, grad in seen if not grad]
    assert refine_calls and not any(refine_calls)
    assert other_calls and all(other_calls[1:])  # the load-time probe aside
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["precision"] == "bf16" and manifest["refine"]["precision"] == "fp32"
