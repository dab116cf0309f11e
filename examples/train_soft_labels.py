"""Train a classifier on a distilled run with its stored soft labels, in a plain torch loop, with the light
reader alone (`pip install "rded[torch]"`: numpy, zstandard, Pillow and your own torch; no torchvision,
DALI or pydantic needed).

    python examples/train_soft_labels.py RUN_DIR [--epochs 300] [--batch-size 50] [--temperature 20]

Each epoch, every image is seen through its stored training view for that epoch and trained towards the
observer's probabilities for exactly that view (KL divergence at temperature T, as the RDED authors train).
The model is a small CNN written here, so the script runs anywhere; put your own in `build_model`.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from rded import DistilledDataset


def build_model(num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def train(run_dir: str, epochs: int, batch_size: int, temperature: float, lr: float, workers: int,
          seed: int = 0) -> list[float]:
    """Returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    ds = DistilledDataset(run_dir, temperature=temperature)
    model = build_model(ds.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    losses = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)  # before the loader starts its workers: picks each image's stored view
        model.train()
        total, seen = 0.0, 0
        for images, soft in DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers):
            log_p = torch.log_softmax(model(images) / temperature, dim=1)
            loss = nn.functional.kl_div(log_p, soft, reduction="batchmean") * temperature ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(images), seen + len(images)
        sched.step()
        losses.append(total / seen)
        print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    train(args.run_dir, args.epochs, args.batch_size, args.temperature, args.lr, args.workers)


if __name__ == "__main__":
    main()
