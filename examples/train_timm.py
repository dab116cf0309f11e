"""Train a timm model on a distilled run with its stored soft labels: timm's model and optimizer factories,
rded's Dataset (`pip install "rded[torch]" timm`).

    python examples/train_timm.py RUN_DIR [--model resnet18] [--epochs 300] [--batch-size 50] [--temperature 20]

As examples/train_soft_labels.py, with `timm.create_model` and `timm.optim.create_optimizer_v2` (AdamW, the
RDED authors' optimiser) and timm's cosine scheduler stepped per epoch.
"""

from __future__ import annotations

import argparse

import timm
import timm.optim
import timm.scheduler
import torch
from torch.utils.data import DataLoader

from rded import DistilledDataset


def train(run_dir: str, model_name: str, epochs: int, batch_size: int, temperature: float, lr: float,
          workers: int, seed: int = 0) -> list[float]:
    """Returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    ds = DistilledDataset(run_dir, temperature=temperature)
    model = timm.create_model(model_name, pretrained=False, num_classes=ds.num_classes)
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.01)
    sched, _ = timm.scheduler.create_scheduler_v2(opt, sched="cosine", num_epochs=epochs, warmup_epochs=0)
    losses = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)  # each image's stored view for this epoch
        model.train()
        total, seen = 0.0, 0
        for images, soft in DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers):
            log_p = torch.log_softmax(model(images) / temperature, dim=1)
            loss = torch.nn.functional.kl_div(log_p, soft, reduction="batchmean") * temperature ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(images), seen + len(images)
        sched.step(epoch + 1)
        losses.append(total / seen)
        print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    train(args.run_dir, args.model, args.epochs, args.batch_size, args.temperature, args.lr, args.workers)


if __name__ == "__main__":
    main()
