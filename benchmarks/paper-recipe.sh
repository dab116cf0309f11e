#!/usr/bin/env bash
# The paper's recipe on ImageWoof (docs/results.md, "The paper's recipe"): S = 224 (patches 112 px), subset
# 300, K = 5, pad, the EfficientNet-Lite0 observer, one IPC 50 run sliced to 10 and 1, 300 stored views;
# ResNet-18 students from scratch at 224 px for 300 epochs; final-epoch and best-of top-1.
# Resumable: a finished step (its output exists) is skipped, a killed distillation or student training
# continues from its last commit or checkpoint. Each row's JSON lands in OUT as soon as it is measured.
# Usage: [STEPS="data random ipc1 ipc10 random50 ipc50 native refine refine-data online50 pool320 val320"] [ONLY=regex] [SEEDS="0"] [STRONGER=imagenet]
#        bash benchmarks/paper-recipe.sh [OUT_DIR]
#   data: the RDED IPC 50 set and its slices, the whole-image random set without crops (about 35 min)
#   random: the random sets under RDED's views and ImageNet's, IPC 10 and its IPC 1 slice (about 10 min)
#   random50: the stronger random baseline's (STRONGER: rdedviews or imagenet) IPC 50 set (about 15 min)
#   ipc1, ipc10: every row at that IPC (IPC 1 about 3 min a row, IPC 10 about 11), for each of SEEDS;
#   ipc50: RDED soft and hard, STRONGER random soft (75-90 min each on 2 cores, resumed with the same
#   command); native: scoring mode native, IPC 10 (about 20 min); refine: RDED + refine at IPC 10 and 1
#   (about 60 min); refine-data: the same with the BN term on the data's statistics (refine.bn_stats = data),
#   and benchmarks/bn_gap.py's table of that term (about 70 min); refine-long: refine-data with 1,000 iterations
#   and the BN-term table with it (about 120 min; not in the default STEPS)
#   online50, pool320: IPC 50 gap candidates: the authors' online teacher on RDED's IPC 50 set and its IPC 10 slice (91 + 20 min);
#   RDED from the full 9,025-photo pool at 320 px (benchmarks/imagewoof2_320.py builds it into out/imagewoof2-320),
#   IPC 50 and its IPC 10 slice (set about 25 min, students as ipc10 and ipc50); val320: those finished RDED rows
#   students validated again on the same val photos at 320 px (--split val of the same script; final only)
#   ONLY: run only the rows whose name matches (for example ONLY='hard' or ONLY='^random-imagenet')
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/paper-recipe}
STEPS=${STEPS:-data random ipc1 ipc10 random50 ipc50 native refine refine-data online50 pool320 val320}
SEEDS=${SEEDS:-0}
STRONGER=${STRONGER:-imagenet}
RDED=.venv/bin/rded
VAL="../shared/data/imagewoof/val-{000000..000001}.tar"
POOL320=out/imagewoof2-320  # relative to the job file's directory below (data.train paths are)
VAL320="out/imagewoof2-320-val/val-{000000..000001}.tar"  # the same 3,929 val photos at 320 px
DATA=(--set relabel.views=300 --set runtime.progress=false)
REFINE=(--set refine.enabled=true --set refine.iterations=400 --set "refine.resolutions=[200,224,200,224]"
        --set refine.bn_weight=0.0001 --set refine.lr=0.05)
# The random baselines differ only in their training views (what the loader does to each stored image):
#   nocrop: the whole image, flipped (the views of factor 1: no shuffle, RandomResizedCrop scale (1, 1));
#   rdedviews: exactly RDED's views (grid shuffle 2 x 2, RandomResizedCrop (0.5, 1), flip), as DD-Ranking;
#   imagenet: the standard ImageNet augmentation (RandomResizedCrop (0.08, 1), flip).
# the authors' student recipe is rded eval's default: 300 epochs, batch 10/50/100, AdamW 1e-3, KL at T = 20
EVAL=(--student resnet18 --epochs 300 --checkpoint-every 10 --resume --quiet)
mkdir -p "$OUT"

timed() {  # name command...: runs the command, appends "name seconds" to times.txt
  local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$OUT/times.txt"
}
distill() {  # job out extra...: a finished run is kept, an unfinished one resumed
  local job=$1 out=$2; shift 2
  [ -f "$out/manifest.json" ] || timed "distill-$(basename "$out")" $RDED distill "$job" --out "$out" --resume "$@"
}
slice() {  # run ipc [out]: the run's tier ipc (default out: run-ipcN)
  local out=${3:-$1-ipc$2}
  [ -f "$out/manifest.json" ] || $RDED slice "$1" --ipc "$2" --out "$out" --overwrite
}
random_set() {  # views ipc out: the random subset whose labels are stored for those views
  local views=()
  case $1 in
    rdedviews) views=(--set relabel.view_grid=2) ;;
    imagenet) views=(--set "relabel.view_scale=[0.08,1.0]") ;;
  esac
  distill jobs/imagewoof-random.toml "$3" --set distill.ipc="$2" --set distill.subset="$2" "${DATA[@]}" "${views[@]}"
}
row() {  # name set extra...: one student per seed, its result in OUT/name[-seedN].json (checkpoint: .ckpt)
  local name=$1 set=$2 seed out; shift 2
  [[ -n ${ONLY:-} && ! $name =~ $ONLY ]] && return 0
  for seed in $SEEDS; do
    out=$OUT/$name$([ "$seed" = 0 ] || echo "-seed$seed").json
    [ -f "$out" ] || timed "eval-$(basename "$out" .json)" $RDED eval --distilled "$set" --val "$VAL" "${EVAL[@]}" --seed "$seed" "$@" --out "$out"
  done
}
refined() {  # name extra...: RDED + refine (extra: its settings) at IPC 10 in OUT/name and its IPC 1 slice, with students
  local name=$1; shift
  distill jobs/imagewoof.toml "$OUT/$name" --set distill.ipc=10 "${DATA[@]}" "${REFINE[@]}" "$@"
  slice "$OUT/$name" 1
  row "$name-stored-ipc1" "$OUT/$name-ipc1"
  row "$name-stored-ipc10" "$OUT/$name"
}
built320() {  # split: stops unless benchmarks/imagewoof2_320.py has built that split (its default OUT) and it verifies
  .venv/bin/python benchmarks/imagewoof2_320.py --check --split "$1" >/dev/null || {
    echo "build it first: python benchmarks/imagewoof2_320.py <git dir of q878787/imagewoof2-320> --split $1" >&2
    exit 2; }
}
revalue() {  # name set: a finished training's student validated again (final epoch only) on the 320-px val
  # (--val adds shards to a list: the 320-px val replaces the 160-px one, it is not given beside it)
  local name=$1 set=$2 out="$OUT/${1%-ipc*}-val320-ipc${1##*-ipc}.json"
  [[ -f $OUT/$name.json && ! -f $out ]] || return 0
  $RDED eval --distilled "$set" "${EVAL[@]}" --seed 0 --val "$VAL320" --checkpoint "$OUT/$name.ckpt" --out "$out"
}
rows() {  # ipc: every row at that IPC; IPC 1 and 10 are slices (RDED, nocrop) or runs (the other random sets)
  local ipc=$1 views
  row rded-stored-ipc$ipc "$OUT/rded-ipc$ipc"
  row rded-hard-ipc$ipc "$OUT/rded-ipc$ipc" --hard-labels
  for views in nocrop rdedviews imagenet; do
    row random-$views-soft-ipc$ipc "$OUT/random-$views-ipc$ipc"
    row random-$views-hard-ipc$ipc "$OUT/random-$views-ipc$ipc" --hard-labels
  done
}

main() {  # one function, read whole before it runs: the file can be edited while a long run uses it
for step in $STEPS; do
  case $step in
    data)
      distill jobs/imagewoof.toml "$OUT/rded" --set distill.ipc=50 "${DATA[@]}"
      random_set nocrop 50 "$OUT/random-nocrop"
      for ipc in 1 10; do slice "$OUT/rded" $ipc; slice "$OUT/random-nocrop" $ipc; done ;;
    random)
      for views in rdedviews imagenet; do
        random_set $views 10 "$OUT/random-$views-ipc10"
        slice "$OUT/random-$views-ipc10" 1 "$OUT/random-$views-ipc1"
      done ;;
    random50)
      random_set "$STRONGER" 50 "$OUT/random-$STRONGER" ;;
    ipc1|ipc10)
      rows "${step#ipc}" ;;
    ipc50)
      row rded-stored-ipc50 "$OUT/rded"
      row rded-hard-ipc50 "$OUT/rded" --hard-labels
      row random-$STRONGER-soft-ipc50 "$OUT/random-$STRONGER"
      row random-nocrop-soft-ipc50 "$OUT/random-nocrop" ;;
    native)
      distill jobs/imagewoof.toml "$OUT/native" --set distill.ipc=10 --set distill.score_mode=native "${DATA[@]}"
      row native-stored-ipc10 "$OUT/native" ;;
    refine)
      refined refine ;;
    refine-data)  # the BN term matches the data's own statistics (refine.bn_stats = data), not ImageNet's
      refined refine-data --set refine.bn_stats=data
      # the BN term of real photos, of RDED's batches and of the refined ones, against both targets
      [ -f "$OUT/bn-gap.md" ] || .venv/bin/python benchmarks/bn_gap.py "$OUT/refine-data/bn_stats.json" \
        "$OUT/rded-ipc10" "$OUT/refine-data" > "$OUT/bn-gap.md" ;;
    refine-long)  # refine-data with 1,000 iterations (250 a stage): half the authors' 2,000, what one session holds
      refined refine-long --set refine.bn_stats=data --set refine.iterations=1000
      [ -f "$OUT/bn-gap-long.md" ] || .venv/bin/python benchmarks/bn_gap.py "$OUT/refine-long/bn_stats.json" \
        "$OUT/rded-ipc10" "$OUT/refine-data" "$OUT/refine-long" > "$OUT/bn-gap-long.md" ;;
    online50)  # the authors' labels: the observer labels every CutMix-ed batch (no stored views); then the IPC 10 slice
      row rded-online-ipc50 "$OUT/rded" --teacher-online --job jobs/imagewoof.toml
      row rded-online-ipc10 "$OUT/rded-ipc10" --teacher-online --job jobs/imagewoof.toml ;;
    pool320)  # the same val split; only the train pool changes
      built320 train
      distill jobs/imagewoof.toml "$OUT/pool320" --set distill.ipc=50 "${DATA[@]}" \
        --set "data.train=[\"../$POOL320/train-{000000..000004}.tar\"]"
      slice "$OUT/pool320" 10
      row pool320-stored-ipc10 "$OUT/pool320-ipc10"
      row pool320-stored-ipc50 "$OUT/pool320" ;;
    val320)  # the finished RDED rows at IPC 10 and 50 validated on the same val split at 320 px (final only)
      built320 val
      revalue rded-stored-ipc10 "$OUT/rded-ipc10"; revalue rded-stored-ipc50 "$OUT/rded"
      revalue pool320-stored-ipc10 "$OUT/pool320-ipc10"; revalue pool320-stored-ipc50 "$OUT/pool320" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
}

main
exit
