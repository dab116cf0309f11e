"""Student training and evaluation with the authors' recipe (DESIGN.md §1), as a plain loop.

AdamW (weight decay on weights of dim > 1 only), a per-epoch cosine schedule, the stored training views
(grid shuffle + RandomResizedCrop + flip, applied by the loader), CutMix per batch with lambda ~ Beta(1, 1),
and KL(teacher || student) at temperature T. Labels come from the stored soft-label shards, from the
observer run online on every mixed batch (the authors' way), or from the classes (hard labels, CE).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from .checkpoint import _kill_switch
from .errors import OptionError
from .keyed import keyed_u64, random_resized_crop
from .models import torchvision_classifier
from .normalization import IMAGENET
from .report import progress_bar
from .runtime import ComputePolicy
from .tario import write_bytes_atomic

# The authors' learning rates by student family (DESIGN.md §1).
LR_BY_FAMILY = (("resnet", 1e-3), ("efficientnet", 2e-3), ("mobilenet", 2.5e-3), ("vgg", 5e-4),
                ("vit", 1e-4), ("swin", 1e-4))

LabelSource = Literal["stored", "online", "hard"]


def default_lr(student: str) -> float:
    return next((lr for family, lr in LR_BY_FAMILY if student.startswith(family)), 1e-3)


def default_batch_size(ipc: int, num_classes: int) -> int:
    """The authors' batch sizes: 10 at IPC 1, 50 at IPC 10, 100 at IPC 50 (x2 for >= 100 classes)."""
    base = 10 if ipc < 10 else 50 if ipc < 50 else 100
    if num_classes >= 100:
        base *= 2
    return max(1, min(base, ipc * num_classes))


@dataclass
class Recipe:
    student: str = "resnet18"
    epochs: int = 300
    resolution: int = 224
    batch_size: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 20.0
    schedule: Literal["cosine", "authors"] = "cosine"  # authors: decays to 0.5x, not 0 (a quirk of their code)
    labels: LabelSource = "stored"
    seed: int = 0
    workers: int = 2


def lr_factor(epoch: int, epochs: int, schedule: str) -> float:
    if schedule == "authors":
        return 0.5 * (1 + math.cos(math.pi * epoch / (2 * epochs)))
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def build_student(name: str, num_classes: int) -> nn.Module:
    return torchvision_classifier(name, num_classes)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cutmix(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix against a permutation of the batch: (mixed images, permutation, lambda = kept area share)."""
    n, _, h, w = images.shape
    lam = torch.rand(1, generator=generator).item()  # Beta(1, 1) is uniform: drawn from the seeded generator
    perm = torch.randperm(n, generator=generator)
    cut = math.sqrt(1.0 - lam)
    cw, ch = int(w * cut), int(h * cut)
    cx, cy = (int(v) for v in torch.randint(0, w, (1,), generator=generator).tolist() +
              torch.randint(0, h, (1,), generator=generator).tolist())
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    return mixed, perm, 1.0 - (x1 - x0) * (y1 - y0) / (w * h)


def soft_target_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(target || softmax(student / T)), batch mean."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), target_probs, reduction="batchmean")


@dataclass
class EpochLog:
    epoch: int
    lr: float
    loss: float
    seconds: float


class TrainingRng:
    """Every RNG a training draws from, as a checkpoint saves it: the global CPU one (initialisation, dropout and
    other random layers), every CUDA device's when the student runs there, and the data loader's own generator.
    The loader draws its workers' base seed when an iterator starts: each epoch, or once with persistent workers
    (so at another epoch in a resumed training). Drawn from the global RNG, that would shift every later dropout
    mask; from its own generator it shifts nothing the student draws."""

    def __init__(self, seed: int, device: torch.device):
        self.loader = torch.Generator().manual_seed(keyed_u64(seed, "loader") >> 1)
        self.cuda = device.type == "cuda"

    def state(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state(), "loader": self.loader.get_state()}
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        self.loader.set_state(state["loader"])
        if self.cuda:  # the checkpoint's identity pins the device type, so a CUDA training saved "cuda"
            torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


# 2: "rng" holds every generator (TrainingRng); 1 (no "format" key) held the global CPU RNG alone
CHECKPOINT_FORMAT = 2


@dataclass
class TrainingCheckpoint:
    """A student training's resumable state in one file, written atomically every `every` epochs and after
    the last: the student, the optimiser, every RNG (`TrainingRng`), the epochs done (the schedule is a function
    of the epoch, and every per-epoch draw a function of (seed, epoch)), and `extra`, the caller's own record
    (for `rded eval`, its best-of checks). `identity` is what a resume must match: the recipe, the data,
    the precision."""

    path: Path
    identity: dict
    every: int = 10
    extra: dict = field(default_factory=dict)

    def load(self) -> dict | None:
        """The saved state, None when there is none; one for another training is refused."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            saved = state["identity"]
        except Exception as e:  # a damaged file: torch and zipfile raise many types
            raise OptionError("checkpoint", f"{self.path} cannot be read ({type(e).__name__}: {e}); "
                                            f"delete it to start the training over") from None
        if state.get("format") != CHECKPOINT_FORMAT:
            # an older one lacks the loader's and CUDA's RNG states: it cannot continue the training bit for bit
            raise OptionError("resume", f"{self.path} is a checkpoint of format {state.get('format', 1)}, written by "
                                        f"another version of rded (this one reads format {CHECKPOINT_FORMAT}); "
                                        f"delete it to start the training over")
        if saved != self.identity:
            differ = sorted(k for k in self.identity.keys() | saved.keys() if saved.get(k) != self.identity.get(k))
            raise OptionError("resume", f"{self.path} is the checkpoint of another training ({', '.join(differ)} "
                                        f"differ); use the same settings, or another --checkpoint")
        self.extra = state["extra"]
        return state

    def due(self, epochs_done: int, epochs: int) -> bool:
        return epochs_done == epochs or (self.every > 0 and epochs_done % self.every == 0)

    def save(self, epochs_done: int, model: nn.Module, opt: torch.optim.Optimizer, rng: TrainingRng) -> None:
        buf = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "identity": self.identity, "epoch": epochs_done,
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng.state(),
                    "extra": self.extra}, buf)
        write_bytes_atomic(self.path, buf.getvalue(), before_rename=lambda: _kill_switch("rename"))
        _kill_switch("epoch")


class EpochBatches(Sampler):
    """Batches of (epoch, index) for the epoch set last, in a seeded shuffle of that epoch; drawn in the main
    process, so one loader with persistent workers serves every epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        shuffle = torch.Generator().manual_seed(keyed_u64(self.seed, "train", self.epoch) >> 1)
        order = torch.randperm(self.n, generator=shuffle).tolist()
        for i in range(0, self.n, self.batch_size):
            yield [(self.epoch, j) for j in order[i:i + self.batch_size]]


class EpochItems(Dataset):
    """A dataset with `set_epoch` (or none) indexed by (epoch, index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def epoch_loaders(train_set: Dataset, recipe: Recipe, generator: torch.Generator) -> Callable[[int], DataLoader]:
    """The loader of each epoch; its workers' seeds come from `generator`, never from the global RNG."""
    if isinstance(train_set, IterableDataset):  # streamed shards shuffle themselves

        def streamed(epoch: int) -> DataLoader:
            train_set.set_epoch(epoch)
            return DataLoader(train_set, batch_size=recipe.batch_size, num_workers=recipe.workers, generator=generator)

        return streamed
    # one loader for every epoch: its workers persist (starting them each epoch cost more than the epoch
    # itself at small IPC), and learn the epoch from each index
    epoch_batches = EpochBatches(len(train_set), recipe.batch_size, recipe.seed)
    loader = DataLoader(EpochItems(train_set), batch_sampler=epoch_batches, num_workers=recipe.workers,
                        persistent_workers=recipe.workers > 0, generator=generator)

    def indexed(epoch: int) -> DataLoader:
        epoch_batches.epoch = epoch
        return loader

    return indexed


def batch_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cutmix_rng: torch.Generator,
               recipe: Recipe, compute: ComputePolicy,
               teacher: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """The loss of one CutMix batch against its labels (stored soft, the teacher's, or hard classes)."""
    mixed, perm, lam = cutmix(images, cutmix_rng)
    mixed, labels = mixed.to(compute.device), labels.to(compute.device)
    logits = compute(model, IMAGENET(mixed))
    if recipe.labels == "online":
        with torch.inference_mode():
            target = F.softmax(teacher(mixed) / recipe.temperature, dim=1)
        # an inference-mode tensor cannot be saved for backward: the clone is a normal tensor
        return soft_target_loss(logits, target.clone(), recipe.temperature)
    if recipe.labels == "stored":
        return soft_target_loss(logits, lam * labels + (1 - lam) * labels[perm], recipe.temperature)
    return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])


def train_student(train_set: Dataset, num_classes: int, recipe: Recipe, *,
                  compute: ComputePolicy = ComputePolicy(torch.device("cpu")),
                  teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  progress: bool = True, on_epoch: Callable[[EpochLog, nn.Module], None] | None = None,
                  checkpoint: TrainingCheckpoint | None = None, resume: dict | None = None) -> nn.Module:
    """Train a student from scratch, every forward pass under `compute` (the loss and the optimiser in fp32).
    `train_set` yields (uint8 CHW view, label) with label a probability vector at T (stored), or a class
    index (hard, or online: then `teacher` maps a uint8 batch to logits). `resume` (a state `checkpoint`
    loaded) continues a training where it stopped; the result is the uninterrupted training's, bit for bit."""
    torch.manual_seed(recipe.seed)
    model = compute.prepare(build_student(recipe.student, num_classes))
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.999))
    rng = TrainingRng(recipe.seed, compute.device)
    start = 0
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        rng.restore(resume["rng"])
        start = resume["epoch"]
    bar = progress_bar(recipe.epochs, f"training {recipe.student}", unit="epoch", enabled=progress, log_every_s=30.0,
                       initial=start)
    loader_of = epoch_loaders(train_set, recipe, rng.loader)
    for epoch in range(start, recipe.epochs):
        started = time.perf_counter()
        lr = recipe.lr * lr_factor(epoch, recipe.epochs, recipe.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        # CutMix draws from its own generator: a loader's draws depend on its workers
        cutmix_rng = torch.Generator().manual_seed(keyed_u64(recipe.seed, "cutmix", epoch) >> 1)
        model.train()
        total, batches = 0.0, 0
        for images, labels in loader_of(epoch):
            loss = batch_loss(model, images, labels, cutmix_rng, recipe, compute, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
        log = EpochLog(epoch, lr, total / max(batches, 1), time.perf_counter() - started)
        bar.set_postfix(loss=f"{log.loss:.4f}")
        bar.update(1)
        if on_epoch:
            on_epoch(log, model)
        if checkpoint and checkpoint.due(epoch + 1, recipe.epochs):
            checkpoint.save(epoch + 1, model, opt, rng)
    bar.close()
    return model.eval()


def labelled_images(urls: Sequence[str], num_classes: int, shuffle: int = 0, rng=None,
                    keys: frozenset[str] | None = None):
    """(RGB PIL image, class, key) from WebDataset shards, skipping samples that do not decode or have no
    label in [0, num_classes) (evaluation reports how many were skipped, from the shards' sample count);
    with `keys`, only those samples (the others are not decoded)."""
    import webdataset as wds
    from PIL import Image

    ds = wds.WebDataset(list(urls), shardshuffle=False, empty_check=False)
    if shuffle:
        ds = ds.shuffle(shuffle, rng=rng)
    for sample in ds:
        if keys is not None and sample["__key__"] not in keys:
            continue
        encoded = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        try:
            label = int(sample["cls"])
            image = Image.open(io.BytesIO(encoded)).convert("RGB")
        except Exception:  # missing or broken member: Pillow and int() raise many types
            continue
        if not 0 <= label < num_classes:
            continue
        yield image, label, sample["__key__"]


class TrainShards(IterableDataset):
    """Full training shards for `rded train-observer`, streamed: (uint8 CHW, class) after a
    RandomResizedCrop to S and a flip, both pure functions of (seed, key, epoch); a seeded shuffle buffer."""

    def __init__(self, urls: Sequence[str], num_classes: int, resolution: int, *, seed: int = 0, buffer: int = 1000):
        self.urls, self.num_classes, self.resolution = list(urls), num_classes, resolution
        self.seed, self.buffer = seed, buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import random

        from torchvision.transforms.v2 import functional as TF

        rng = random.Random(keyed_u64(self.seed, "shuffle", self.epoch))
        for image, label, key in labelled_images(self.urls, self.num_classes, self.buffer, rng):
            image = TF.pil_to_tensor(image)
            h, w = image.shape[-2:]
            x, y, cw, ch = random_resized_crop(self.seed, ("train", key, self.epoch), w, h, (0.08, 1.0),
                                               (3 / 4, 4 / 3))
            image = TF.resized_crop(image, y, x, ch, cw, [self.resolution, self.resolution], antialias=True)
            if keyed_u64(self.seed, "flip", key, self.epoch) % 2:
                image = image.flip(-1)
            yield image, int(label)


class ValShards(IterableDataset):
    """Validation shards as (uint8 CHW, class): Resize(S * 8/7) then CenterCrop(S), as the authors do;
    with `keys`, only those samples."""

    def __init__(self, urls: Sequence[str], num_classes: int, resolution: int, keys: Sequence[str] | None = None):
        self.urls, self.num_classes, self.resolution = list(urls), num_classes, resolution
        self.keys = frozenset(keys) if keys is not None else None

    def __iter__(self):
        from torchvision.transforms import v2

        tf = v2.Compose([v2.PILToTensor(), v2.Resize(int(self.resolution * 8 / 7), antialias=True),
                         v2.CenterCrop(self.resolution)])
        for image, label, key in labelled_images(self.urls, self.num_classes, keys=self.keys):
            yield tf(image), label, key


@dataclass
class Accuracy:
    top1: float
    top5: float
    count: int
    keys_unique: bool


def evaluate(model: nn.Module, val: ValShards, *, batch_size: int = 100, workers: int = 0,
             compute: ComputePolicy = ComputePolicy(torch.device("cpu"))) -> Accuracy:
    """Top-1 and top-5 over every validation sample, each once (checked by key), the model run under `compute`."""
    # its own generator: evaluating between epochs takes nothing from the training's global RNG
    loader = DataLoader(val, batch_size=batch_size, num_workers=min(workers, len(val.urls)),
                        generator=torch.Generator().manual_seed(0))
    correct1 = correct5 = count = 0
    keys: set[str] = set()
    duplicate = False
    model.eval()
    with torch.inference_mode():
        for images, labels, batch_keys in loader:
            logits = compute(model, IMAGENET(images.to(compute.device))).cpu()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == labels).sum().item()
            correct5 += (top == labels[:, None]).any(dim=1).sum().item()
            count += len(labels)
            for k in batch_keys:
                duplicate |= k in keys
                keys.add(k)
    return Accuracy(correct1 / max(count, 1), correct5 / max(count, 1), count, not duplicate)


def save_student(model: nn.Module, path: Path) -> None:
    buf = io.BytesIO()
    # contiguous fp32 tensors on the CPU: the file loads anywhere, whatever layout training used
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    write_bytes_atomic(path, buf.getvalue())
