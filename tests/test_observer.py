"""Observers by spec: torchvision name + state dict, TorchScript, EfficientNet-Lite0 with its class map."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from conftest import SHARED_IMAGEWOOF
from rded.config import job_from_dict
from rded.observer import build_observer, check_observer
from rded.runtime import ComputePolicy
from rded.score import Scorer
from rded.source import load_classes

FP32 = ComputePolicy(torch.device("cpu"))  # comparisons against the plain fp32 model


def job_for(tmp_path, observer: dict, classes: str | None = None):
    shard = tmp_path / "x.tar"
    shard.touch()
    data = {"train": str(shard)}
    if classes:
        data["classes"] = classes
    return job_from_dict({"data": data, "observer": observer}, base_dir=tmp_path)


def test_torchvision_observer_loads_weights_and_scores(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", num_classes=5).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    job = job_for(tmp_path, {"kind": "torchvision", "arch": "resnet18", "weights": "r18.pt", "num_outputs": 5})
    check_observer(job, None)
    obs = build_observer(job, None, FP32)
    assert obs.normalization.name == "imagenet" and obs.output_index.tolist() == [0, 1, 2, 3, 4]
    patches = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    scorer = Scorer(obs, mode="pad", resolution=32, score_batch=4, decimals=4)
    lp = scorer.log_probs(patches)
    # pad mode: the observer sees the patch centred on a zero (mean-colour) 32x32 canvas
    x = obs.normalize(torch.as_tensor(patches).permute(0, 3, 1, 2))
    canvas = torch.zeros(3, 3, 32, 32)
    canvas[:, :, 8:24, 8:24] = x
    with torch.inference_mode():
        expected = torch.log_softmax(model(canvas), 1)
    assert torch.allclose(lp, expected, atol=1e-4)
    assert np.allclose(scorer.score(patches, np.array([0, 1, 4])), expected[[0, 1, 2], [0, 1, 4]].numpy(), atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scores_do_not_depend_on_the_other_patches_in_the_batch(tmp_path, data_dir, precision):
    job = job_for(tmp_path, {"kind": "torchscript", "weights": str(data_dir / "observer.pt")})
    obs = build_observer(job, None, ComputePolicy(torch.device("cpu"), precision))
    scorer = Scorer(obs, mode="native", resolution=32, score_batch=8, decimals=4)
    patches = np.random.default_rng(1).integers(0, 256, (21, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(21) % 3
    whole = scorer.score(patches, labels)
    pieces = np.concatenate([scorer.score(patches[i:i + 5], labels[i:i + 5]) for i in range(0, 21, 5)])
    assert np.array_equal(whole, pieces)


def test_wrong_weights_are_a_job_error(tmp_path):
    from rded.errors import JobError

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    job = job_for(tmp_path, {"kind": "torchvision", "arch": "resnet18", "weights": "bad.pt"})
    with pytest.raises(JobError, match="does not fit resnet18"):
        build_observer(job, None, FP32)


@pytest.mark.skipif(not (SHARED_IMAGEWOOF / "val-000000.tar").is_file(), reason="ImageWoof shards not present")
def test_efficientnet_lite0_classifies_imagewoof_val(tmp_path):
    """The check DESIGN.md asks for before trusting an observer: 256 val images, Resize(256) +
    CenterCrop(224), own normalisation, the 10 breeds' outputs (published figure: 94.5 %)."""
    from PIL import Image
    from torchvision.transforms import v2

    classes = str(SHARED_IMAGEWOOF / "classes.json")
    job = job_for(tmp_path, {"kind": "efficientnet-lite0", "class_map": "imagenet_index"}, classes)
    obs = build_observer(job, load_classes(job), FP32)
    assert obs.normalization.name == "lite"
    assert obs.output_index.tolist() == [c["imagenet_index"] for c in json.loads(open(classes).read())]
    tf = v2.Compose([v2.Resize(256), v2.CenterCrop(224)])
    images, labels = [], []
    with tarfile.open(SHARED_IMAGEWOOF / "val-000000.tar") as tar:
        pending = {}
        for m in tar:
            key, ext = m.name.split(".", 1)
            pending.setdefault(key, {})[ext] = tar.extractfile(m).read()
            if len(pending[key]) == 2:
                item = pending.pop(key)
                im = tf(Image.open(io.BytesIO(item["jpg"])).convert("RGB"))
                images.append(torch.as_tensor(np.array(im)))
                labels.append(int(item["cls"]))
            if len(images) == 256:
                break
    correct = 0
    with torch.inference_mode():
        for i in range(0, 256, 32):
            x = obs.normalize(torch.stack(images[i:i + 32]).permute(0, 3, 1, 2))
            correct += (obs.class_logits(x).argmax(1) == torch.tensor(labels[i:i + 32])).sum().item()
    assert correct / 256 > 0.90
