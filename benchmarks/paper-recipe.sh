#!/usr/bin/env bash
# The paper's recipe on ImageWoof (docs/results.md, "The paper's recipe"): S = 224 (patches 112 px), subset
# 300, K = 5, pad, the EfficientNet-Lite0 observer, one IPC 50 run sliced to 10 and 1, 300 stored views;
# ResNet-18 students from scratch at 224 px for 300 epochs; final-epoch and best-of top-1.
# Resumable: a finished step (its output exists) is skipped, a killed distillation or student training
# continues from its last commit or checkpoint. Each row's JSON lands in OUT as soon as it is measured.
# Usage: [STEPS="data ipc1 ipc10 native refine ipc50"] bash benchmarks/paper-recipe.sh [OUT_DIR]
#   data: the RDED and random IPC 50 sets and their slices (about 35 min on 2 CPU cores)
#   ipc1: four rows (about 15 min); ipc10: three rows (about 45 min); native: scoring mode native, IPC 10
#   (about 20 min); refine: RDED + refine at IPC 10 and its IPC 1 slice (about 60 min);
#   ipc50: two rows (75-90 min each on 2 cores: one per 3-hour session, resumed with the same command)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/paper-recipe}
STEPS=${STEPS:-data ipc1 ipc10 native refine ipc50}
RDED=.venv/bin/rded
VAL="../shared/data/imagewoof/val-{000000..000001}.tar"
DATA=(--set relabel.views=300 --set runtime.progress=false)
REFINE=(--set refine.enabled=true --set refine.iterations=400 --set "refine.resolutions=[200,224,200,224]"
        --set refine.bn_weight=0.0001 --set refine.lr=0.05)
# the authors' student recipe is rded eval's default: 300 epochs, batch 10/50/100, AdamW 1e-3, KL at T = 20
EVAL=(--val "$VAL" --student resnet18 --epochs 300 --checkpoint-every 10 --resume --quiet)
mkdir -p "$OUT"

timed() {  # name command...: runs the command, appends "name seconds" to times.txt
  local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$OUT/times.txt"
}
distill() {  # job out extra...: a finished run is kept, an unfinished one resumed
  local job=$1 out=$2; shift 2
  [ -f "$out/manifest.json" ] || timed "distill-$(basename "$out")" $RDED distill "$job" --out "$out" --resume "$@"
}
slice() {  # run ipc
  [ -f "$1-ipc$2/manifest.json" ] || $RDED slice "$1" --ipc "$2" --out "$1-ipc$2" --overwrite
}
row() {  # name set extra...: one student, its result in OUT/name.json (its checkpoint OUT/name.ckpt)
  local name=$1 set=$2; shift 2
  [ -f "$OUT/$name.json" ] || timed "eval-$name" $RDED eval --distilled "$set" "${EVAL[@]}" "$@" --out "$OUT/$name.json"
}

for step in $STEPS; do
  case $step in
    data)
      distill jobs/imagewoof.toml "$OUT/rded" --set distill.ipc=50 "${DATA[@]}"
      distill jobs/imagewoof-random.toml "$OUT/random" --set distill.ipc=50 --set distill.subset=50 "${DATA[@]}"
      for ipc in 1 10; do slice "$OUT/rded" $ipc; slice "$OUT/random" $ipc; done ;;
    ipc1|ipc10)
      ipc=${step#ipc}
      row rded-stored-ipc$ipc "$OUT/rded-ipc$ipc"
      row random-soft-ipc$ipc "$OUT/random-ipc$ipc"
      row random-hard-ipc$ipc "$OUT/random-ipc$ipc" --hard-labels ;;
    native)
      distill jobs/imagewoof.toml "$OUT/native" --set distill.ipc=10 --set distill.score_mode=native "${DATA[@]}"
      row native-stored-ipc10 "$OUT/native" ;;
    refine)
      distill jobs/imagewoof.toml "$OUT/refine" --set distill.ipc=10 "${DATA[@]}" "${REFINE[@]}"
      slice "$OUT/refine" 1
      row refine-stored-ipc1 "$OUT/refine-ipc1"
      row refine-stored-ipc10 "$OUT/refine" ;;
    ipc50)
      row rded-stored-ipc50 "$OUT/rded"
      row random-soft-ipc50 "$OUT/random" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
