#!/usr/bin/env bash
# RDED vs RDED + refine (FADRM) on ImageWoof under the CPU recipe of docs/results.md (S = 112, 100 epochs,
# 100 stored views, ResNet-18 students, seed 0). Refinement runs on an IPC 10 run; IPC 1 is its slice
# (tiers stay exact under refinement). The refine budget is scaled to 2 CPU cores: 400 iterations over
# 100/112/100/112 px (the authors': 2,000 over 200/224/200/224 at S = 224).
# Usage: bash benchmarks/refine-results.sh [OUT_DIR]      (about 100 minutes on 2 CPU cores)
#   VARIANTS="plain refine bn1e-4 lr005"  which rows to make: plain = RDED; refine = + refine with the authors'
#   settings; bn1e-4 = the same with bn_weight 1e-4; lr005 = bn_weight 1e-4 and lr 0.05
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/refine-results}
VARIANTS=${VARIANTS:-plain refine bn1e-4 lr005}
RDED=.venv/bin/rded
VAL="../shared/data/imagewoof/val-{000000..000001}.tar"
RECIPE=(--set distill.ipc=10 --set distill.resolution=112 --set relabel.views=100 --set runtime.progress=false)
REFINE=(--set refine.enabled=true --set refine.iterations=400 --set "refine.resolutions=[100,112,100,112]")
EVAL=(--val "$VAL" --student resnet18 --epochs 100 --resolution 112 --quiet)
mkdir -p "$OUT"

for variant in $VARIANTS; do
  case $variant in
    plain) extra=() ;;
    refine) extra=("${REFINE[@]}") ;;
    bn1e-4) extra=("${REFINE[@]}" --set refine.bn_weight=0.0001) ;;
    lr005) extra=("${REFINE[@]}" --set refine.bn_weight=0.0001 --set refine.lr=0.05) ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  $RDED distill jobs/imagewoof.toml --out "$OUT/$variant-ipc10" "${RECIPE[@]}" "${extra[@]}" --overwrite
  $RDED slice "$OUT/$variant-ipc10" --ipc 1 --out "$OUT/$variant-ipc1" --overwrite
  for ipc in 1 10; do
    $RDED eval --distilled "$OUT/$variant-ipc$ipc" "${EVAL[@]}" --out "$OUT/eval-$variant-ipc$ipc.json"
  done
done
