"""torchvision classifiers by name: one check of the name, for observers and students alike."""

from __future__ import annotations

from torch import nn


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def torchvision_classifier(arch: str, num_classes: int) -> nn.Module:
    """An untrained torchvision classification model; ValueError naming the model for an unknown name."""
    import torchvision

    if arch not in torchvision_names():
        raise ValueError(f"{arch!r} is not a torchvision classification model")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
