"""Model architectures: torchvision classifiers by name (one check of the name, for observers and students
alike), and the small CNN of the demo and the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class SmallCNN(nn.Module):
    """Three stride-2 stages of conv-BN-ReLU pairs, global max pooling, linear head; any input >= 16 px.

    Max rather than average pooling: the object is small among clutter (and a scored patch fills only the centre
    of a zero-padded input), so averaging dilutes its evidence; max pooling learns about twice as fast here.
    """

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, 2 * width, 4 * width):
            for stride in (2, 1):
                layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))
