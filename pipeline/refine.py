"""Refine (FADRM): optimise the stitched images against the observer(s), adding the original patches back
at every stage boundary (an adjustable residual connection), so the images keep their real-image content.

The authors' recipe (DESIGN.md §5): loss = CE(observer(x), y) + bn_weight * sum_l w_l (||var_l(x) -
running_var_l||_2 + ||mean_l(x) - running_mean_l||_2), w = first_bn_multiplier on the first BN layer and 1
on the others, over the batch statistics of each BN layer's input; Adam betas (0.5, 0.9), a cosine from lr
to 0 over all iterations and a fresh optimiser per stage; per step a RandomResizedCrop to the stage size,
a flip and a roll of up to `jitter` px, the same for the whole batch; pixels clipped after every step.
The image is optimised in ImageNet-normalised units, as the authors do (so `lr` means what theirs means);
each observer is fed its own normalisation.

A batch is image j of every class, so the refinement of image j depends only on the images j: tiers stay
exact (an IPC 50 run sliced to 10 equals an IPC 10 run). Every random choice is a pure function of (seed,
image index, iteration). A batch larger than `micro_batch` is run in micro-batches with exactly the same
gradient: a first pass without gradients sums each BN layer's input statistics over the whole batch, and
the second pass back-propagates, per micro-batch, a surrogate whose gradient is the whole batch's.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import RefineConfig
from .errors import JobError
from .keyed import keyed_u64, random_resized_crop
from .normalization import IMAGENET
from .observer import Observer
from .tario import write_bytes_atomic

CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults, as the authors'
BETAS = (0.5, 0.9)
_MEAN = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
RECORD_WINDOW = 10  # a stage's start and end losses are means over this many iterations


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers in registration order (the first is the stem's). A TorchScript file's
    layers are not nn.BatchNorm objects and cannot be hooked, so it has none here."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BNTerm:
    """Forward hook on one BN layer: ||var(x) - running_var||_2 + ||mean(x) - running_mean||_2 over the
    batch statistics of the layer's input x, computed directly, or accumulated over micro-batches.
    `target` (float32 mean and variance on the layer's device) replaces the running statistics
    (refine.bn_stats = "data", rded.bnstats); accumulating alone measures those statistics."""

    def __init__(self, module: nn.Module, weight: float, target: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.module, self.weight, self.target = module, weight, target
        self.mode = "off"  # off | direct | accumulate | surrogate
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def distance(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.target is None:
            target_mean, target_var = m.running_mean.float(), m.running_var.float()
        else:
            target_mean, target_var = self.target
        return torch.linalg.vector_norm(target_var - var) + torch.linalg.vector_norm(target_mean - mean)

    def start_accumulating(self) -> None:
        self.mode, self.sum, self.sumsq, self.count = "accumulate", 0.0, 0.0, 0

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """The accumulated per-channel mean and population variance (over N, H, W: what `distance` compares),
        float64."""
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean ** 2).clamp_min(0)
        return mean.cpu().numpy(), var.cpu().numpy()

    def finish_accumulating(self) -> float:
        """The term's value over the whole batch; prepares the surrogate's gradient weights."""
        mean = (self.sum / self.count).float().requires_grad_(True)
        var = (self.sumsq / self.count - (self.sum / self.count) ** 2).float().clamp_min(0).requires_grad_(True)
        value = self.distance(mean, var)
        grad_mean, grad_var = torch.autograd.grad(value, (mean, var))
        self.mean, self.grad_mean, self.grad_var = mean.detach(), grad_mean, grad_var
        self.mode = "surrogate"
        return value.item()

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()
        if self.mode == "direct":
            self.value = self.distance(x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
        elif self.mode == "accumulate":
            with torch.no_grad():
                self.sum = self.sum + x.double().sum((0, 2, 3))
                self.sumsq = self.sumsq + x.double().square().sum((0, 2, 3))
                self.count += x.numel() // x.shape[1]
        elif self.mode == "surrogate":
            # d/dx_i of this equals d(distance)/dx_i of the whole batch: g_mean/N + 2 g_var (x_i - mean)/N
            self.value = ((self.grad_mean * x.sum((0, 2, 3))).sum()
                          + (self.grad_var * (x - self.mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))).sum()) / self.count

    def remove(self) -> None:
        self.handle.remove()


@dataclass(frozen=True)
class Step:
    """The augmentation of one iteration, the same for the whole batch."""

    window: tuple[int, int, int, int]  # x, y, w, h on the stage-size image
    flip: bool
    roll: tuple[int, int]  # down, right, px


def draw_step(seed: int, image_index: int, iteration: int, size: int, jitter: int) -> Step:
    parts = ("refine", image_index, iteration)
    return Step(random_resized_crop(seed, parts, size, size, CROP_SCALE, CROP_RATIO),
                keyed_u64(seed, *parts, "flip") % 2 == 1,
                (keyed_u64(seed, *parts, "dy") % (jitter + 1), keyed_u64(seed, *parts, "dx") % (jitter + 1)))


def augment(z: torch.Tensor, step: Step, size: int) -> torch.Tensor:
    x, y, w, h = step.window
    out = z[:, :, y:y + h, x:x + w]
    if (h, w) != (size, size):
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if step.flip:
        out = out.flip(3)
    return torch.roll(out, shifts=step.roll, dims=(2, 3)) if any(step.roll) else out


def resize(z: torch.Tensor, size: int) -> torch.Tensor:
    if z.shape[-1] == size:
        return z
    return F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)


@dataclass
class StageRecord:
    resolution: int
    iterations: list[int]  # [first, end) global iteration numbers
    loss_start: float  # mean total loss over the stage's first RECORD_WINDOW iterations
    loss_end: float  # ... and over its last RECORD_WINDOW iterations
    ce_end: float
    bn_end: float
    drift_start: float  # mean |x - original| in [0, 1] pixel units at the stage's size, after any merge
    drift_end: float  # ... after its last step
    merged_after: bool  # the original was added back after this stage


@dataclass
class BatchRecord:
    image_index: int
    images: int
    stages: list[StageRecord]

    def to_json(self) -> dict:
        return asdict(self)


def pixels_of(z: torch.Tensor) -> torch.Tensor:
    return z * _STD.to(z.device) + _MEAN.to(z.device)


class Refiner:
    """Refines batches of stitched images (image j of every class) with one or more observers in turn."""

    def __init__(self, cfg: RefineConfig, observers: Sequence[Observer], names: Sequence[str], *, seed: int,
                 resolution: int):
        self.cfg, self.observers, self.names = cfg, list(observers), list(names)
        self.seed, self.resolution = seed, resolution
        self.device = self.observers[0].device
        self.layers: list[list[nn.Module]] = []
        for obs, name in zip(self.observers, self.names):
            layers = bn_layers(obs.model) if cfg.bn_weight > 0 else []
            if cfg.bn_weight > 0 and not layers:
                raise JobError(f"refine: observer {name} has no BatchNorm layers to match (a TorchScript file's "
                               "layers cannot be hooked); use an observer with BN layers, or set refine.bn_weight = 0")
            self.layers.append(layers)
        self.terms: list[list[BNTerm]] = [[] for _ in self.observers]
        # per observer and BN layer, the (mean, var) to match instead of the running statistics (bn_stats = data)
        self.targets: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def layer_names(self) -> list[list[str]]:
        """Each observer's matched BN layers by module name (the records name them)."""
        out = []
        for obs, layers in zip(self.observers, self.layers):
            names = {id(m): n for n, m in obs.model.named_modules()}
            out.append([names[id(m)] for m in layers])
        return out

    def use_statistics(self, stats: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]) -> None:
        """Match these (mean, var) per observer and BN layer instead of the running statistics; they must fit
        the layers (ValueError otherwise)."""
        widths = [[m.num_features for m in layers] for layers in self.layers]
        if [[(len(m), len(v)) for m, v in obs] for obs in stats] != [[(w, w) for w in ws] for ws in widths]:
            raise ValueError("the BN statistics do not fit the observers' BN layers")
        self.targets = [[(torch.from_numpy(np.asarray(m)).float().to(self.device),
                          torch.from_numpy(np.asarray(v)).float().to(self.device)) for m, v in obs] for obs in stats]

    @contextlib.contextmanager
    def _hooked(self):
        """BN hooks and frozen weights for the length of one batch; the observers are as before afterwards
        (relabelling runs them next)."""
        frozen = [[p.requires_grad for p in obs.model.parameters()] for obs in self.observers]
        for obs in self.observers:
            for p in obs.model.parameters():
                p.requires_grad_(False)
        self.terms = [[BNTerm(m, self.cfg.first_bn_multiplier if i == 0 else 1.0,
                              None if self.targets is None else self.targets[o][i]) for i, m in enumerate(layers)]
                      for o, layers in enumerate(self.layers)]
        try:
            yield
        finally:
            for terms in self.terms:
                for t in terms:
                    t.remove()
            self.terms = [[] for _ in self.observers]
            for obs, flags in zip(self.observers, frozen):
                for p, flag in zip(obs.model.parameters(), flags):
                    p.requires_grad_(flag)

    def lr_at(self, iteration: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * iteration / self.cfg.iterations)) * self.cfg.lr

    def loss_and_grad(self, z: torch.Tensor, labels: torch.Tensor, step: Step, size: int,
                      observer: int) -> tuple[float, float, float]:
        """Accumulates d(loss)/dz into z.grad; returns (loss, ce, bn) of the whole batch."""
        obs, terms, cfg = self.observers[observer], self.terms[observer], self.cfg
        n = z.shape[0]
        parts = [(a, min(a + cfg.micro_batch, n)) for a in range(0, n, cfg.micro_batch)]

        def forward(a: int, b: int) -> torch.Tensor:
            x = augment(z[a:b], step, size)
            return obs.class_logits(obs.normalize(pixels_of(x) * 255.0))  # under the observer's precision policy

        if len(parts) == 1:
            for t in terms:
                t.mode = "direct"
            ce = F.cross_entropy(forward(0, n), labels)
            bn = sum((t.weight * t.value for t in terms), torch.zeros((), device=z.device))
            loss = ce + cfg.bn_weight * bn
            loss.backward()
            return loss.item(), ce.item(), bn.item()
        bn_value = 0.0
        if terms:
            for t in terms:
                t.start_accumulating()
            with torch.no_grad():
                for a, b in parts:
                    forward(a, b)
            bn_value = sum(t.weight * t.finish_accumulating() for t in terms)
        ce_sum = 0.0
        for a, b in parts:
            ce = F.cross_entropy(forward(a, b), labels[a:b], reduction="sum")
            surrogate = sum((t.weight * t.value for t in terms), torch.zeros((), device=z.device))
            (ce / n + cfg.bn_weight * surrogate).backward()
            ce_sum += ce.item()
        for t in terms:
            t.mode = "off"
        return ce_sum / n + cfg.bn_weight * bn_value, ce_sum / n, bn_value

    def refine(self, canvases: np.ndarray, labels: Sequence[int], image_index: int) -> tuple[np.ndarray, BatchRecord]:
        """uint8 [B, S, S, 3] stitched images of one batch -> the refined uint8 images and the batch's record."""
        with self._hooked():
            return self._refine(canvases, labels, image_index)

    def _refine(self, canvases: np.ndarray, labels: Sequence[int], image_index: int) -> tuple[np.ndarray, BatchRecord]:
        cfg = self.cfg
        original = (torch.from_numpy(canvases).permute(0, 3, 1, 2).float().to(self.device) / 255.0 -
                    _MEAN.to(self.device)) / _STD.to(self.device)
        target = torch.tensor(list(labels), dtype=torch.long, device=self.device)
        low, high = (-_MEAN / _STD).to(self.device), ((1 - _MEAN) / _STD).to(self.device)
        per_stage = cfg.stage_iterations
        z = resize(original, cfg.resolutions[0]).clone()  # never a view of the original: z is updated in place
        stages: list[StageRecord] = []
        for s, size in enumerate(cfg.resolutions):
            anchor = resize(original, size)
            z = z.detach().requires_grad_(True)
            optimizer = torch.optim.Adam([z], lr=cfg.lr, betas=BETAS)
            drift_start = self._drift(z, anchor)
            losses: list[tuple[float, float, float]] = []
            for it in range(s * per_stage, (s + 1) * per_stage):
                for group in optimizer.param_groups:
                    group["lr"] = self.lr_at(it)
                optimizer.zero_grad(set_to_none=False)
                step = draw_step(self.seed, image_index, it, size, cfg.jitter)
                losses.append(self.loss_and_grad(z, target, step, size, it % len(self.observers)))
                optimizer.step()
                with torch.no_grad():
                    z.copy_(torch.maximum(torch.minimum(z, high), low))
            last = s == len(cfg.resolutions) - 1
            head, tail = losses[:RECORD_WINDOW], losses[-RECORD_WINDOW:]
            stages.append(StageRecord(
                size, [s * per_stage, (s + 1) * per_stage], _mean(l[0] for l in head), _mean(l[0] for l in tail),
                _mean(l[1] for l in tail), _mean(l[2] for l in tail), drift_start, self._drift(z, anchor),
                merged_after=not last))
            z = z.detach()
            if not last:
                nxt = cfg.resolutions[s + 1]
                z = cfg.merge * resize(z, nxt) + (1 - cfg.merge) * resize(original, nxt)
        out = pixels_of(z.detach())
        if out.shape[-1] != self.resolution:
            out = F.interpolate(out, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                                antialias=True)
        images = (out.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return images, BatchRecord(image_index, len(labels), stages)

    @staticmethod
    def _drift(z: torch.Tensor, anchor: torch.Tensor) -> float:
        with torch.no_grad():
            return _round((pixels_of(z) - pixels_of(anchor)).abs().mean().item())


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _mean(values) -> float:
    values = list(values)
    return _round(sum(values) / len(values))


class Spool:
    """Refined images and batch records kept on disk between the refine and write stages (a batch is image
    j of every class, a shard holds several images of each class, so no batch is written as it is made)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, image: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, image, allow_pickle=False)
        write_bytes_atomic(self.dir / f"{key}.npy", buf.getvalue())

    def image(self, key: str) -> np.ndarray:
        return np.load(self.dir / f"{key}.npy", allow_pickle=False)

    def has_batch(self, image_index: int, keys: Sequence[str]) -> bool:
        """Whether batch `image_index` is committed: its record, written after its images, is there."""
        return (self.dir / f"batch-{image_index:06d}.json").is_file() and all(
            (self.dir / f"{key}.npy").is_file() for key in keys)

    def put_record(self, record: BatchRecord) -> None:
        write_bytes_atomic(self.dir / f"batch-{record.image_index:06d}.json", json.dumps(record.to_json()).encode())

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("batch-*.json"))]
