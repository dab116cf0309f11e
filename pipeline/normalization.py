"""Input normalisation, one rule for every model we run: (pixel - 255 * mean) / (255 * std) per channel.

A normalisation belongs to a model (as timm ties mean and std to a model's config): each registered
observer carries its own, and torchvision students use ImageNet's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normalization:
    name: str
    mean: tuple[float, float, float]  # in [0, 1] units
    std: tuple[float, float, float]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0-255) [..., 3, H, W] -> the float input the model was trained on."""
        # scaled in float32 exactly as scores have always been computed: the job's bytes depend on it
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1) * 255.0
        return (x.float() - mean) / std


IMAGENET = Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TensorFlow-converted EfficientNet-Lite weights: (x - 127) / 128 (both exact in float32)
LITE = Normalization("lite", (127 / 255,) * 3, (128 / 255,) * 3)

BY_NAME = {n.name: n for n in (IMAGENET, LITE)}
