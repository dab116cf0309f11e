#!/usr/bin/env bash
# Reproduces the "Precision" section of docs/performance.md: rded bench in fp32 and bf16 (pad and native),
# the whole ImageWoof job in each precision, bf16's fidelity against fp32, refinement and student training
# speed, torch.compile, and student top-1 under the CPU recipe of docs/results.md in each precision.
# Every step skips itself when its result exists, so a killed run resumes.
# Usage: bash benchmarks/precision.sh [OUT_DIR] [STEP ...]    (all steps: about 80 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/precision}; shift || true
STEPS=${*:-bench job resume fidelity refine train compile students}
RDED=.venv/bin/rded
PY=.venv/bin/python
VAL="../shared/data/imagewoof/val-{000000..000001}.tar"
# the reference-style baseline gets our allocator setting too, so the ratio measures the work, not malloc
export GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824
mkdir -p "$OUT"
has() { [[ " $STEPS " == *" $1 "* ]]; }
log() { echo "[$(date +%T)] $*" >&2; }

if has bench; then
  for mode in pad native; do
    [ -f "$OUT/bench-$mode/bench.json" ] && continue
    log "bench $mode"
    $RDED bench jobs/imagewoof.toml --out "$OUT/bench-$mode" --precision fp32 --precision bf16 \
      --set distill.subset=30 --set relabel.enabled=false --set runtime.progress=false --set distill.score_mode=$mode
  done
fi
if has job; then  # the whole job at the paper's settings (V = 300); the staging folder's size every 2 s
  for p in bf16 fp32; do
    [ -f "$OUT/job-$p/manifest.json" ] && continue
    log "job $p"
    ( while sleep 2; do du -sb "$OUT/job-$p/.rded-staging" 2>/dev/null | cut -f1; done > "$OUT/job-$p.staging-bytes" ) &
    poll=$!
    $RDED distill jobs/imagewoof.toml --out "$OUT/job-$p" --set runtime.precision=$p --set runtime.progress=false --overwrite
    kill $poll 2>/dev/null || true
  done
fi
if has resume && [ ! -f "$OUT/resume/manifest.json" ]; then
  # the bf16 job SIGKILLed at a seeded random point of its uninterrupted time, then resumed
  total=$($PY -c "import json; print(json.load(open('$OUT/job-bf16/report.json'))['seconds'])")
  at=$($PY -c "import random; print(round(random.Random(0).uniform(0.05, 0.95) * $total))")
  log "resume: kill at ${at} s of ${total} s"
  t0=$SECONDS
  timeout -s KILL "$at" $RDED distill jobs/imagewoof.toml --out "$OUT/resume" --set runtime.precision=bf16 \
    --set runtime.progress=false --overwrite || true
  killed=$((SECONDS - t0)); t0=$SECONDS
  $RDED distill jobs/imagewoof.toml --out "$OUT/resume" --set runtime.precision=bf16 --set runtime.progress=false --resume
  echo "{\"killed_at_s\": $killed, \"resume_s\": $((SECONDS - t0)), \"uninterrupted_s\": $total}" > "$OUT/resume.json"
  for f in $(cd "$OUT/job-bf16" && ls *.tar manifest.json samples.tsv); do
    cmp -s "$OUT/job-bf16/$f" "$OUT/resume/$f" || echo "resume: $f differs" >&2
  done
fi
if has fidelity && [ ! -f "$OUT/fidelity.json" ]; then
  log "fidelity"
  $PY benchmarks/precision_fidelity.py jobs/imagewoof.toml "$OUT/job-fp32" "$OUT/job-bf16" --out "$OUT/fidelity.json"
fi
if has refine; then  # 10 images (IPC 1) with the README's CPU settings (S = 112, 400 iterations)
  for p in bf16 fp32; do
    [ -f "$OUT/refine-$p/manifest.json" ] && continue
    log "refine $p"
    $RDED distill jobs/imagewoof.toml --out "$OUT/refine-$p" --set runtime.precision=$p --set distill.ipc=1 \
      --set distill.subset=30 --set distill.resolution=112 --set refine.enabled=true --set refine.iterations=400 \
      --set "refine.resolutions=[100,112,100,112]" --set refine.bn_weight=0.0001 --set refine.lr=0.05 \
      --set relabel.enabled=false --set runtime.progress=false --overwrite
  done
fi
if has train && [ ! -f "$OUT/train-speed.json" ]; then
  log "train speed"
  $PY benchmarks/model_speed.py train --out "$OUT/train-speed.json"
fi
if has compile && [ ! -f "$OUT/compile.json" ]; then
  log "compile"
  $PY benchmarks/model_speed.py compile --out "$OUT/compile.json"
fi
if has students; then  # the CPU recipe of docs/results.md: S = 112, 100 views, 100 epochs
  for p in bf16 fp32; do
    if [ ! -f "$OUT/students-$p/rded-ipc10/manifest.json" ]; then
      log "students $p: distill"
      $RDED distill jobs/imagewoof.toml --out "$OUT/students-$p/rded-ipc10" --set distill.resolution=112 \
        --set relabel.views=100 --set runtime.precision=$p --set runtime.progress=false --overwrite
      $RDED slice "$OUT/students-$p/rded-ipc10" --ipc 1 --out "$OUT/students-$p/rded-ipc1" --overwrite
    fi
    for ipc in 1 10; do
      [ -f "$OUT/students-$p/eval-ipc$ipc.json" ] && continue
      log "students $p: IPC $ipc"
      $RDED eval --distilled "$OUT/students-$p/rded-ipc$ipc" --val "$VAL" --student resnet18 --epochs 100 \
        --resolution 112 --precision $p --quiet --out "$OUT/students-$p/eval-ipc$ipc.json"
    done
  done
fi
log "done: $OUT"
