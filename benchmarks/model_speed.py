"""Model-call speed in each precision (docs/performance.md, "Precision"): the student's training steps with the
real training loop (rded.train.train_student: CutMix, KL at T, AdamW), and torch.compile (inductor, with
freezing for inference) against eager, compile time included.

    .venv/bin/python benchmarks/model_speed.py train [--sizes 112,224] [--images 100] [--epochs 3]
    .venv/bin/python benchmarks/model_speed.py compile [--batches 8]

Inputs are random: speed, not accuracy. Run it on an otherwise idle machine, under the job's allocator
setting (rded.runtime.keep_large_allocations, applied here as the CLI does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import Dataset

from rded.runtime import ComputePolicy, keep_large_allocations


class RandomViews(Dataset):
    """`n` random uint8 views with soft labels over `classes`: what DistilledDataset yields."""

    def __init__(self, n: int, size: int, classes: int = 10):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.labels = torch.softmax(torch.randn(n, classes, generator=g), 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def train_speed(sizes: list[int], images: int, epochs: int) -> list[dict]:
    from rded.train import Recipe, train_student

    rows = []
    for size in sizes:
        for precision in ("fp32", "bf16"):
            seconds = []
            recipe = Recipe(epochs=epochs, resolution=size, batch_size=50, workers=0)
            train_student(RandomViews(images, size), 10, recipe, compute=ComputePolicy(torch.device("cpu"), precision),
                          progress=False, on_epoch=lambda log, model: seconds.append(log.seconds))
            steady = statistics.median(seconds[1:])  # the first epoch warms the kernels up
            rows.append({"resolution": size, "precision": precision, "images_per_s": round(images / steady, 1),
                         "epoch_seconds": [round(s, 2) for s in seconds]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def timed_rate(fn, x, batches: int) -> tuple[float, float]:
    """(seconds of the first call, steady batches/s over `batches` calls)."""
    t0 = time.perf_counter()
    fn(x)
    first = time.perf_counter() - t0
    fn(x)
    t0 = time.perf_counter()
    for _ in range(batches):
        fn(x)
    return first, batches / (time.perf_counter() - t0)


def compile_speed(batches: int) -> list[dict]:
    import torch._inductor.config as inductor

    from rded.config import ObserverConfig
    from rded.observer import REGISTRY
    from rded.train import build_student

    rows = []
    x = torch.randn(32, 3, 224, 224)
    model = REGISTRY["efficientnet-lite0"].factory(ObserverConfig(kind="efficientnet-lite0"), None).eval()
    for precision in ("fp32", "bf16"):
        policy = ComputePolicy(torch.device("cpu"), precision)
        m = policy.prepare(model)
        with torch.inference_mode():
            eager_first, eager = timed_rate(lambda b: policy(m, b), x, batches)
            ref = policy(m, x)
            inductor.freezing = True
            torch._dynamo.reset()
            compiled = torch.compile(m)
            compile_first, comp = timed_rate(lambda b: policy(compiled, b), x, batches)
            diff = (policy(compiled, x).log_softmax(1) - ref.log_softmax(1)).abs().max().item()
            inductor.freezing = False
        rows.append({"model": "efficientnet-lite0 inference, batch 32 at 224", "precision": precision,
                     "eager_images_per_s": round(32 * eager, 1), "compiled_images_per_s": round(32 * comp, 1),
                     "compile_seconds": round(compile_first, 1), "max_log_prob_change": diff})
        print(json.dumps(rows[-1]), flush=True)
    for precision in ("fp32", "bf16"):
        policy = ComputePolicy(torch.device("cpu"), precision)
        torch.manual_seed(0)
        student = policy.prepare(build_student("resnet18", 10))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        xb, yb = torch.randn(50, 3, 112, 112), torch.randint(0, 10, (50,))

        def step(model):
            def run(b):
                loss = torch.nn.functional.cross_entropy(policy(model, b), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return run

        eager_first, eager = timed_rate(step(student), xb, batches)
        torch._dynamo.reset()
        compiled = torch.compile(student)
        compile_first, comp = timed_rate(step(compiled), xb, batches)
        rows.append({"model": "resnet-18 training step, batch 50 at 112", "precision": precision,
                     "eager_images_per_s": round(50 * eager, 1), "compiled_images_per_s": round(50 * comp, 1),
                     "compile_seconds": round(compile_first, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "compile"])
    ap.add_argument("--sizes", default="112,224")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    keep_large_allocations()
    rows = (train_speed([int(s) for s in args.sizes.split(",")], args.images, args.epochs) if args.what == "train"
            else compile_speed(args.batches))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
