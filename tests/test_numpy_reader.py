"""The torch-free reader (rded.numpy_reader): the same views, view parameters and probabilities as
rded.DistilledDataset, with numpy and Pillow alone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rded.loader import DistilledDataset
from rded.numpy_reader import RunArrays

LIGHT = r'''
import sys
import rded.numpy_reader
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "nvidia", "pydantic")))
'''


def test_the_numpy_reader_imports_no_torch():
    proc = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.parametrize("resolution", [None, 20, 48])
def test_views_parameters_and_probabilities_are_the_datasets(baseline_run, resolution):
    """Every image at every stored view (and one epoch past them): the same view parameters and
    probabilities; the same pixels within the resize's rounding: at most 2 grey levels apart (measured: none
    differ on this run at its own size, 5 % of values by 1 level when shrinking to 20 px, 0.18 % by at most
    2 on an ImageWoof run at 224 px); a wrong crop or permutation would differ by far more."""
    ds = DistilledDataset(baseline_run, temperature=4.0, normalize=False, resolution=resolution)
    run = RunArrays(baseline_run)
    assert run.keys == ds.keys and run.targets == ds.targets and len(run) == len(ds)
    differing, total, largest = 0, 0, 0
    for epoch in range(run.num_views + 1):
        ds.set_epoch(epoch)
        for i in range(len(run)):
            image, target = ds[i]
            assert run.view(i, epoch) == run.view(i, epoch % run.num_views)
            np.testing.assert_allclose(run.probabilities(i, epoch, temperature=4.0), target.numpy(), rtol=0, atol=1e-6)
            ours = run.training_view(i, epoch, resolution).astype(int)
            theirs = image.permute(1, 2, 0).numpy().astype(int)
            assert ours.shape == theirs.shape
            diff = np.abs(ours - theirs)
            largest, differing, total = max(largest, int(diff.max())), differing + int((diff > 0).sum()), total + diff.size
    assert largest <= 2 and differing <= 0.1 * total, (largest, differing, total)
    if resolution is None:  # no resize at the run's own size only when the crop is whole; here: exact
        assert differing == 0


def test_a_tampered_run_is_refused(baseline_run, tmp_path):
    import shutil

    from rded.errors import RunError

    copy = shutil.copytree(baseline_run, tmp_path / "run")
    shard = sorted(copy.glob("labels-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(RunError, match="sha256"):
        RunArrays(copy)
