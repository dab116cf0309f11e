#!/usr/bin/env bash
# The 1,000-class form of ImageWoof (labels are ImageNet indices, the classes are EfficientNet-Lite0's
# 1,000 outputs; docs/results.md, "1,000 classes"):
#  1. the soft-label codec at the issue's size: IPC 10, S = 224, V = 300 (bytes and fidelity in the manifest);
#  2. the CPU recipe of docs/results.md at IPC 10 (S = 112, 100 views), trained with the stored labels and
#     with the observer online; top-1 over all 1,000 classes.
# Usage: bash benchmarks/imagewoof1k-results.sh [OUT_DIR]   (about 50 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/imagewoof1k}
RDED=.venv/bin/rded
mkdir -p "$OUT"
.venv/bin/python benchmarks/imagewoof1k.py ../shared/data/imagewoof "$OUT/data"
JOB="$OUT/data/job.toml"
VAL="$OUT/data/val-{000000..000001}.tar"
TRAIN=(--val "$VAL" --student resnet18 --epochs 100 --resolution 112 --quiet)

timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$OUT/times.txt"; }

timed distill-cpu-recipe $RDED distill "$JOB" --out "$OUT/ipc10" --set distill.resolution=112 \
  --set relabel.views=100 --overwrite
timed eval-stored $RDED eval --distilled "$OUT/ipc10" "${TRAIN[@]}" --out "$OUT/stored-ipc10.json"
timed eval-online $RDED eval --distilled "$OUT/ipc10" "${TRAIN[@]}" --teacher-online --job "$JOB" \
  --out "$OUT/online-ipc10.json"
timed distill-s224-v300 $RDED distill "$JOB" --out "$OUT/s224-v300" --set relabel.views=300 --overwrite
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
labels = json.load(open(f"{out}/s224-v300/manifest.json"))["labels"]
print("codec at S=224, V=300:", {k: labels[k] for k in ("format", "classes", "topk", "bytes", "image_bytes",
                                                        "bytes_ratio", "mean_kl_t1", "mean_kl_t20")})
for name in ("stored", "online"):
    r = json.load(open(f"{out}/{name}-ipc10.json"))
    print(name, {k: r[k] for k in r if k in ("top1", "top5", "classes", "train_seconds")})
PY
