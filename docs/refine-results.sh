#!/usr/bin/env bash
# RDED vs RDED + refine (FADRM) on ImageWoof under the CPU recipe of docs/results.md (S = 112, 100 epochs,
# 100 stored views, ResNet-18 students, seed 0). Refinement runs on an IPC 10 run; IPC 1 is its slice
# (tiers stay exact under refinement). The refine budget is scaled to 2 CPU cores: 400 iterations over
# 100/112/100/112 px (the authors': 2,000 over 200/224/200/224 at S = 224).
# Usage: bash docs/refine-results.sh [OUT_DIR]      (about 70 minutes on 2 CPU cores)
#   VARIANTS="plain lite0"  which rows to make (plain = RDED, lite0 = refine with the job's observer,
#                           lite0-bn1e-4 = the same with bn_weight 1e-4, r18 = refine with an ImageWoof ResNet-18)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/refine-results}
VARIANTS=${VARIANTS:-plain lite0}
RDED=.venv/bin/rded
TRAIN_SHARDS="../shared/data/imagewoof/train-{000000..000001}.tar"
VAL="../shared/data/imagewoof/val-{000000..000001}.tar"
RECIPE=(--set distill.ipc=10 --set distill.resolution=112 --set relabel.views=100 --set runtime.progress=false)
REFINE=(--set refine.enabled=true --set refine.iterations=400 --set "refine.resolutions=[100,112,100,112]")
EVAL=(--val "$VAL" --student resnet18 --epochs 100 --resolution 112 --quiet)
mkdir -p "$OUT"

for variant in $VARIANTS; do
  case $variant in
    plain) extra=() ;;
    lite0) extra=("${REFINE[@]}") ;;
    lite0-bn1e-4) extra=("${REFINE[@]}" --set refine.bn_weight=0.0001) ;;
    r18)
      [ -f "$OUT/resnet18-imagewoof.pt" ] || $RDED train-observer --train "$TRAIN_SHARDS" --num-classes 10 \
        --arch resnet18 --epochs 10 --resolution 112 --val "$VAL" --out "$OUT/resnet18-imagewoof.pt" --quiet
      extra=("${REFINE[@]}" --set "refine.observers=[{kind=\"torchvision\", arch=\"resnet18\", num_outputs=10, weights=\"$(realpath "$OUT")/resnet18-imagewoof.pt\"}]") ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  $RDED distill jobs/imagewoof.toml --out "$OUT/$variant-ipc10" "${RECIPE[@]}" "${extra[@]}" --overwrite
  $RDED slice "$OUT/$variant-ipc10" --ipc 1 --out "$OUT/$variant-ipc1" --overwrite
  for ipc in 1 10; do
    $RDED eval --distilled "$OUT/$variant-ipc$ipc" "${EVAL[@]}" --out "$OUT/eval-$variant-ipc$ipc.json"
  done
done
