#!/usr/bin/env bash
# Reproduces the table in docs/results.md: ImageWoof, EfficientNet-Lite0 observer, ResNet-18 students,
# the CPU recipe (S = 112, 100 epochs, 100 stored views), IPC 1 and 10 as slices of one IPC=50 run.
# Usage: [IPCS="1 10 50"] bash benchmarks/imagewoof-results.sh [OUT_DIR]   (IPC 1 and 10: about 60 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/imagewoof-results}
IPCS=${IPCS:-1 10}
RDED=.venv/bin/rded
VAL="../shared/data/imagewoof/val-{000000..000001}.tar"
RECIPE=(--set distill.ipc=50 --set distill.resolution=112 --set relabel.views=100)
TRAIN=(--val "$VAL" --student resnet18 --epochs 100 --resolution 112 --quiet)
mkdir -p "$OUT"

timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$OUT/times.txt"; }

timed distill-rded $RDED distill jobs/imagewoof.toml --out "$OUT/rded-ipc50" "${RECIPE[@]}" --overwrite
timed distill-random $RDED distill jobs/imagewoof-random.toml --out "$OUT/random-ipc50" "${RECIPE[@]}" \
  --set distill.subset=50 --overwrite
for ipc in $IPCS; do
  [ "$ipc" = 50 ] && continue  # the IPC=50 runs themselves
  $RDED slice "$OUT/rded-ipc50" --ipc $ipc --out "$OUT/rded-ipc$ipc" --overwrite
  $RDED slice "$OUT/random-ipc50" --ipc $ipc --out "$OUT/random-ipc$ipc" --overwrite
done
for ipc in $IPCS; do
  $RDED eval --distilled "$OUT/rded-ipc$ipc" "${TRAIN[@]}" --out "$OUT/rded-stored-ipc$ipc.json"
  $RDED eval --distilled "$OUT/rded-ipc$ipc" "${TRAIN[@]}" --teacher-online --job jobs/imagewoof.toml \
    --out "$OUT/rded-online-ipc$ipc.json"
  $RDED eval --distilled "$OUT/random-ipc$ipc" "${TRAIN[@]}" --out "$OUT/random-soft-ipc$ipc.json"
  $RDED eval --distilled "$OUT/random-ipc$ipc" "${TRAIN[@]}" --hard-labels --out "$OUT/random-hard-ipc$ipc.json"
done
