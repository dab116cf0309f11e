"""`rded bench`: the job's stages, a reference-style baseline and the observer-only ceiling, side by side.

- ours: the job itself (its report.json), end to end;
- reference: what the authors' code does, written by us on the same drawn images: Pillow decode,
  torchvision RandomResizedCrop K times per image, per-class batches through the observer with the patch
  padded to S (always: their `pad`), sort, stitch, JPEG. It runs in its own process without our allocator setting (runtime.py), as theirs would;
- ceiling: the observer alone on random patches of the same shape, in batches of the same size.

The job and the ceiling run once per precision asked (`--precision`, default fp32 and auto), the reference
once, in fp32 as the authors' code runs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import BenchConfig, JobConfig, load_job
from .distill import run_distill
from .errors import OptionError
from .observer import build_observer
from .records import SampleRef
from .report import escape_field, peak_rss_mib
from .runtime import ComputePolicy, resolve_devices, resolve_precision
from .score import Scorer
from .source import expand_shards, load_classes, scan_shard
from .tario import read_member


def observer_ceiling(job: JobConfig, patches: int = 1024) -> dict[str, float]:
    """Patches/s of the observer alone, on random uint8 patches shaped as the job's, under the job's policy."""
    device, _ = resolve_devices(job.runtime.device, job.runtime.decoder)
    cfg = job.distill
    observer = build_observer(job, load_classes(job), ComputePolicy.resolve(device, job.runtime.precision))
    scorer = Scorer(observer, mode=cfg.score_mode, resolution=cfg.resolution, score_batch=job.runtime.score_batch,
                    decimals=cfg.score_decimals)
    x = torch.randint(0, 256, (patches, cfg.patch_size, cfg.patch_size, 3), dtype=torch.uint8)
    scorer.log_probs(x[: job.runtime.score_batch])  # warm-up
    start = time.perf_counter()
    scorer.log_probs(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"patches_per_s": patches / seconds, "images_per_s": patches / seconds / cfg.crops, "seconds": seconds}


def reference_style(job: JobConfig, drawn_keys: dict[int, list[tuple[str, int, int, int]]], out: Path) -> dict:
    """The authors' way, on the given drawn images: class by class, Pillow + torchvision transforms."""
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    device, _ = resolve_devices(job.runtime.device, job.runtime.decoder)
    cfg = job.distill
    shards = expand_shards(job)
    # the authors' code runs the observer eager, fp32, in the default layout
    observer = build_observer(job, load_classes(job), ComputePolicy(device, "fp32", channels_last=False))
    crop = transforms.RandomResizedCrop(cfg.patch_size, scale=(0.08, 1.0), ratio=(1.0, 1.0), antialias=True)
    to_tensor = transforms.PILToTensor()
    times = {"decode_crop": 0.0, "score": 0.0, "select_stitch": 0.0}
    pad = cfg.resolution - cfg.patch_size
    n_images = 0
    out.mkdir(parents=True, exist_ok=True)
    for label, refs in sorted(drawn_keys.items()):
        t0 = time.perf_counter()
        crops = []
        for _, shard, offset, size in refs:
            image = Image.open(io.BytesIO(read_member(shards[shard].path, offset, size))).convert("RGB")
            crops.extend(to_tensor(crop(image)) for _ in range(cfg.crops))
        batch = torch.stack(crops)
        t1 = time.perf_counter()
        scores = []
        with torch.inference_mode():
            for i in range(0, len(batch), job.runtime.score_batch):
                x = observer.normalize(batch[i:i + job.runtime.score_batch].to(device))
                # always padded to S, as the authors' code does, whatever mode ours runs in
                x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
                logits = observer.class_logits(x)
                target = torch.full((len(x),), label, device=device)
                scores.append(-F.cross_entropy(logits, target, reduction="none").cpu())
        t2 = time.perf_counter()
        per_image = torch.cat(scores).view(len(refs), cfg.crops)
        best = per_image.argmax(1)
        key_patches = [(per_image[i, best[i]].item(), batch[i * cfg.crops + best[i]]) for i in range(len(refs))]
        key_patches.sort(key=lambda t: -t[0])
        top = key_patches[: cfg.patches_per_image * cfg.ipc]
        n = len(top) // cfg.patches_per_image
        for j in range(n):
            cells = [top[k * n + j][1] for k in range(cfg.patches_per_image)]  # the authors' rank stride
            rows = [torch.cat(cells[r * cfg.factor:(r + 1) * cfg.factor], dim=2) for r in range(cfg.factor)]
            canvas = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
            Image.fromarray(np.ascontiguousarray(canvas)).save(out / f"{label:05d}_{j:04d}.jpg", quality=75)
        times["decode_crop"] += t1 - t0
        times["score"] += t2 - t1
        times["select_stitch"] += time.perf_counter() - t2
        n_images += len(refs)
    total = sum(times.values())
    return {"images": n_images, "seconds": total, "images_per_s": n_images / total,
            "stages": {k: {"seconds": round(v, 3)} for k, v in times.items()}, "peak_rss_mib": peak_rss_mib()}


def bench_precisions(job: JobConfig, requested: list[str]) -> list[str]:
    """The precisions to compare, `auto` resolved on this machine, each once, in the order asked."""
    device, _ = resolve_devices(job.runtime.device, job.runtime.decoder)
    return list(dict.fromkeys(resolve_precision(p, device) for p in requested))


def bench_ours(job: JobConfig, out_dir: Path) -> dict[str, Any]:
    """The job itself, end to end, from its report."""
    summary = run_distill(job, out_dir, overwrite=True)
    report = json.loads((out_dir / "report.json").read_text())
    stages = report["stages"]
    relabel_s = stages.get("relabel", {}).get("seconds", 0.0)
    distill_s = report["seconds"] - relabel_s
    ours = {"images": summary.scored_images, "seconds": round(report["seconds"], 3),
            "distill_seconds": round(distill_s, 3), "images_per_s": round(summary.scored_images / distill_s, 2),
            "stages": stages, "peak_rss_mib": report["peak_rss_mib"], "compute": report["compute"]}
    if torch.cuda.is_available():
        ours["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return ours


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    job, out_dir = load_job(cfg.job, cfg.overrides), cfg.out
    if cfg.reference and any(s.url for s in expand_shards(job)):
        raise OptionError("no_reference", "needed for http(s):// or pipe: shards: the reference-style "
                                          "baseline reads local shards only (it seeks)")
    precisions = bench_precisions(job, cfg.precisions)
    result: dict[str, Any] = {"job": str(cfg.job), "overrides": cfg.overrides, "precisions": precisions, "runs": {}}
    for precision in precisions:
        pjob = load_job(cfg.job, [*cfg.overrides, f"runtime.precision={precision}"])
        ours = bench_ours(pjob, out_dir / f"ours-{precision}")
        ceiling = observer_ceiling(pjob)
        result["runs"][precision] = {"ours": ours, "ceiling": {k: round(v, 2) for k, v in ceiling.items()},
                                     "fraction_of_ceiling": round(ours["images_per_s"] / ceiling["images_per_s"], 3)}
    if cfg.reference:  # on the images the first precision's run drew (every precision draws the same)
        drawn: dict[int, list] = {}
        for line in (out_dir / f"ours-{precisions[0]}" / "samples.tsv").read_text().splitlines()[1:]:
            key, shard, status = line.split("\t")[:3]
            if status in ("distilled", "scored"):
                drawn.setdefault(shard, set()).add(key)
        arg = out_dir / "reference-input.json"
        arg.write_text(json.dumps({"job": str(cfg.job), "overrides": cfg.overrides,
                                   "drawn": {s: sorted(k) for s, k in drawn.items()}}))
        proc = subprocess.run([sys.executable, "-m", "rded.bench", "--reference", str(arg),
                               str(out_dir / "reference")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"reference-style baseline failed:\n{proc.stderr[-2000:]}")
        result["reference"] = json.loads(proc.stdout.strip().splitlines()[-1])
        for run in result["runs"].values():
            run["speedup_vs_reference"] = round(run["ours"]["images_per_s"] / result["reference"]["images_per_s"], 2)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    rows = [("stage", "seconds", "rate")]
    extra = []
    for precision, run in result["runs"].items():
        ours, ceiling = run["ours"], run["ceiling"]
        for name, s in ours["stages"].items():
            unit = next((k for k in s if k.endswith("_per_s")), None)
            rate = f"{s[unit]:.1f} {unit.replace('_per_s', '/s')}" if unit and s[unit] else ""
            rows.append((f"ours {precision}: {name}", f"{s['seconds']:.2f}", rate))
        rows.append((f"ours {precision}: distillation end to end", f"{ours['distill_seconds']:.1f}",
                     f"{ours['images_per_s']:.1f} images/s"))
        rows.append((f"ceiling {precision}: observer only", f"{ceiling['seconds']:.1f}",
                     f"{ceiling['images_per_s']:.1f} images/s ({ceiling['patches_per_s']:.1f} patches/s)"))
        extra.append(f"{precision}: peak RSS {ours['peak_rss_mib']:.0f} MiB, ours / ceiling "
                     f"{run['fraction_of_ceiling']:.2f}"
                     + (f", ours / reference {run['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in run else ""))
    if "reference" in result:
        ref = result["reference"]
        for name, s in ref["stages"].items():
            rows.append((f"reference (fp32): {name}", f"{s['seconds']:.2f}", ""))
        rows.append(("reference (fp32): end to end", f"{ref['seconds']:.1f}", f"{ref['images_per_s']:.1f} images/s"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    return "\n".join(lines + extra)


def _reference_main(arg: str, out: str) -> None:
    spec = json.loads(Path(arg).read_text())
    job = load_job(spec["job"], spec["overrides"])

    shards = expand_shards(job)
    drawn: dict[int, list] = {}
    for i, shard in enumerate(shards):
        keys = set(spec["drawn"].get(shard.name, []))
        for rec in scan_shard(i, shard):
            if isinstance(rec, SampleRef) and escape_field(rec.key) in keys:  # the ledger escapes keys
                drawn.setdefault(rec.label, []).append((rec.key, rec.shard, rec.offset, rec.size))
    print(json.dumps(reference_style(job, drawn, Path(out))))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--reference":
        _reference_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: rded bench JOB.toml --out DIR [--set k=v ...]")
