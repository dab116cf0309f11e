"""The scale benchmark: the whole job on a synthetic set shaped like ImageNet-1K (1,000 classes, 1,281,167
samples in 1,024 shards), at 10 %, 30 % and 100 % of its shards, with a cheap observer, subset 300 and
IPC 50. Reports wall time per stage, the index pass in samples/s, peak RSS, and the sizes of samples.tsv,
manifest.json and report.json (docs/performance.md, "ImageNet-1K scale").

    .venv/bin/python benchmarks/scale_bench.py --data /scratch/imagenet-shaped --out /scratch/scale [--fractions 0.1,0.3,1]

The set is written once under --data (about 6 GB, 5 minutes) and reused. The observer is a random linear
layer on 4 x 4 average-pooled pixels with 1,000 outputs (TorchScript): its scores are arbitrary and its
cost next to nothing, and patches are scored at their own size (`score_mode = "native"`), so the figures
are the pipeline's own. One DALI thread and (with OMP_NUM_THREADS=1) one torch thread: one core. Each run
is a separate `rded distill` process, so peak RSS is that run's alone, given twice: the job's own
(report.json, read as the job finishes) and the process's (os.wait4), which also counts the ~80-120 MB that
torch's and DALI's libraries touch while the interpreter exits (`import rded.distill` alone does it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rded.synthetic import IMAGENET_TRAIN_SAMPLES, save_torchscript, write_imagenet_shaped

SHARDS = 1024
JOB = """[data]
train = "{data}/train-{{000000..{last:06d}}}.tar"

[distill]
ipc = 50
subset = 300
crops = 5
factor = 2
resolution = 64
score_mode = "native"
seed = 0

[observer]
kind = "torchscript"
weights = "{data}/observer-linear-1000.pt"

[relabel]
views = {views}

[runtime]
batch_size = 256
dali_threads = 1
progress = false

[output]
shard_size = 1000
"""


class PooledLinear(nn.Module):
    """The cheapest observer that still looks at the patch: 4 x 4 average pooling, then a linear layer."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 4), 1))


def ensure_data(data: Path) -> None:
    done = data / ".complete"
    if not done.is_file():
        t0 = time.perf_counter()
        write_imagenet_shaped(data, samples=IMAGENET_TRAIN_SAMPLES, num_shards=SHARDS,
                              log=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        done.write_text(f"{time.perf_counter() - t0:.0f} s\n")
    if not (data / "observer-linear-1000.pt").is_file():
        torch.manual_seed(0)
        save_torchscript(PooledLinear(1000), data / "observer-linear-1000.pt")


def run_fraction(data: Path, out: Path, fraction: float, views: int, reuse: bool = False) -> dict:
    shards = max(1, round(SHARDS * fraction))
    job = out / f"job-{shards}.toml"
    job.write_text(JOB.format(data=data.resolve(), last=shards - 1, views=views))
    run_dir = out / f"run-{shards}"
    log = out / f"run-{shards}.log"
    if not (reuse and (run_dir / "manifest.json").is_file()):
        t0 = time.perf_counter()
        with open(log, "w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "rded", "distill", str(job), "--out", str(run_dir),
                                     "--overwrite"], stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, exit included
            err.seek(0)
            stderr = err.read()
        log.write_text(f"wall {time.perf_counter() - t0:.1f} process_max_rss_kib {usage.ru_maxrss}\n{stderr}")
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"rded distill failed ({os.waitstatus_to_exitcode(status)}):\n{stderr[-3000:]}")
    head = log.read_text().split()
    report = json.loads((run_dir / "report.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = report["stages"]
    index = stages["source_select"]
    return {
        "fraction": fraction, "shards": shards, "samples": report["accounting"]["input_samples"],
        "drawn": sum(c["drawn"] for c in manifest["classes"]), "images": manifest["images"],
        "wall_s": float(head[1]), "job_s": report["seconds"], "peak_rss_mib": report["peak_rss_mib"],
        "process_max_rss_mib": round(int(head[3]) / 1024, 1) if head[2:3] == ["process_max_rss_kib"] else None,
        "index_samples_per_s": round(index["images_per_s"]),
        "stages_s": {name: s["seconds"] for name, s in stages.items()},
        "bytes": {name: (run_dir / name).stat().st_size for name in ("samples.tsv", "manifest.json", "report.json")},
        "log_tail": log.read_text().strip().splitlines()[-2:],
    }


def table(rows: list[dict]) -> str:
    stage_names = [s for s in rows[0]["stages_s"]]
    head = (["share", "shards", "samples", "drawn", "index samples/s"] + [f"{s} s" for s in stage_names]
            + ["job s", "peak RSS MiB (report)", "process max RSS MiB", "samples.tsv MB", "manifest KB", "report KB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([f"{r['fraction']:.0%}", r["shards"], f"{r['samples']:,}", f"{r['drawn']:,}",
                  f"{r['index_samples_per_s']:,}"] + [f"{r['stages_s'].get(s, 0):.1f}" for s in stage_names]
                 + [f"{r['job_s']:.0f}", f"{r['peak_rss_mib']:.0f}", f"{r['process_max_rss_mib'] or 0:.0f}",
                    f"{r['bytes']['samples.tsv'] / 1e6:.1f}",
                    f"{r['bytes']['manifest.json'] / 1e3:.0f}", f"{r['bytes']['report.json'] / 1e3:.1f}"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="where the synthetic set is (written if absent)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fractions", default="0.1,0.3,1", help="shares of the 1,024 shards, comma-separated")
    parser.add_argument("--views", type=int, default=4, help="relabel.views (stored views per image)")
    parser.add_argument("--reuse", action="store_true", help="report finished runs in --out instead of rerunning")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_data(args.data)
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        print(f"running {fraction:.0%} of the shards ...", file=sys.stderr, flush=True)
        rows.append(run_fraction(args.data, args.out, fraction, args.views, args.reuse))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        (args.out / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    first, last = rows[0], rows[-1]
    for what in ("peak_rss_mib", "process_max_rss_mib"):
        if first[what] and last[what]:
            print(f"{what}: {last[what]:.0f} MiB at {last['fraction']:.0%} vs {first[what]:.0f} MiB at "
                  f"{first['fraction']:.0%}: {100 * (last[what] / first[what] - 1):+.1f} %")
    print(f"host: {resource.getpagesize()} B pages; {math.ceil(sum(r['wall_s'] for r in rows))} s in all")


if __name__ == "__main__":
    main()
