#!/usr/bin/env bash
# Reproduces docs/performance.md: rded bench on ImageWoof (EfficientNet-Lite0, K = 5, S = 224, IPC 10,
# subset 100 per class, relabelling off so the distillation itself is timed), in `pad` and `native`
# mode, and the peak-RSS check at 1x and 4x the input samples. Usage: bash benchmarks/performance.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/performance}
RDED=.venv/bin/rded
COMMON=(--set distill.subset=100 --set relabel.enabled=false --set runtime.progress=false)
mkdir -p "$OUT"
$RDED bench jobs/imagewoof.toml --out "$OUT/pad" "${COMMON[@]}"
$RDED bench jobs/imagewoof.toml --out "$OUT/native" "${COMMON[@]}" --set distill.score_mode=native

# Peak RSS against data size: the same job on 1x and 4x the samples (synthetic, 8 classes)
.venv/bin/python - "$OUT" <<'PY'
import json, subprocess, sys
from pathlib import Path
from rded.synthetic import SmallCNN, save_torchscript, write_synthetic_shards
out = Path(sys.argv[1]) / "rss"
out.mkdir(parents=True, exist_ok=True)
save_torchscript(SmallCNN(8, width=16).eval(), out / "observer.pt")  # untrained: memory, not quality
for scale, per_class in (("1x", 500), ("4x", 2000)):
    data = out / f"data-{scale}"
    write_synthetic_shards(data, num_classes=8, per_class=per_class, num_shards=8, seed=1)
    job = out / f"job-{scale}.toml"
    job.write_text(f'[data]\ntrain = "{data}/train-{{000000..000007}}.tar"\nclasses = "{data}/classes.json"\n'
                   f'[distill]\nipc = 10\nsubset = 100\nresolution = 64\n[relabel]\nenabled = false\n'
                   f'[observer]\nkind = "torchscript"\nweights = "{out}/observer.pt"\n[runtime]\nprogress = false\n')
    subprocess.run([".venv/bin/rded", "distill", str(job), "--out", str(out / f"run-{scale}"), "--overwrite"], check=True)
    report = json.loads((out / f"run-{scale}" / "report.json").read_text())
    print(scale, report["accounting"]["input_samples"], "samples, peak RSS", report["peak_rss_mib"], "MiB")
PY
