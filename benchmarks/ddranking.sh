#!/usr/bin/env bash
# DD-Ranking (PyPI `ddranking`, NUS-HPC-AI-Lab/DD-Ranking) on a finished ImageWoof run, CPU only.
#
#   benchmarks/ddranking.sh [RUN]          default RUN: out/reliability-job (ImageWoof, IPC 10, 224 px)
#
# Everything it writes is outside the repo: DD-Ranking's own venv ($DDR_VENV, it pins numpy<2 so it must not
# go into .venv), the export ($DDR_EXPORT) and the real ImageWoof train/val as ImageFolders ($DDR_DATA).
# It runs on one core (taskset -c $DDR_CPU, OMP_NUM_THREADS=1). Settings (env): DDR_MODEL (ConvNet-3),
# DDR_IM_SIZE (32), DDR_EPOCHS (20; DD-Ranking validates every 20 epochs, fewer gives 0), DDR_BATCH (10; with
# 100 images, 10 SGD steps an epoch; it is also the val batch), DDR_NUM_EVAL (1),
# DDR_SYN_LR (unset: DD-Ranking searches 5 lrs, as for the random baseline), DDR_VAL_PER_CLASS (0 = the whole val split), DDR_WORKAROUNDS (0; 1 = patch, in memory,
# the three ddranking 0.2.0 bugs that stop it on ImageWoof: Subset.targets, teacher_models, test_loader_real;
# see ddranking_eval.py).
# Any failure stops the script with the step, file:line and message (helper: benchmarks/ddranking_eval.py).
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-out/reliability-job}
VENV=${DDR_VENV:-/tmp/ddr-venv}
EXPORT=${DDR_EXPORT:-/tmp/woof-ddr}
DATA=${DDR_DATA:-/tmp/woof-ddr-data}
SHARDS=${DDR_SHARDS:-../shared/data/imagewoof}
CPU=${DDR_CPU:-1}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PIN="taskset -c $CPU"
T0=$(date +%s)

fail() { echo "DD-RANKING FAILED at step: $1 (exit $2)${3:+; see $3}" >&2; [ -n "${3:-}" ] && tail -25 "$3" >&2; exit 1; }
step() { echo "== $1 ($(( $(date +%s) - T0 )) s)"; }

step "1. venv $VENV: torch==2.14.1 torchvision==0.29.1, then ddranking"
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" || fail "python3.11 -m venv $VENV" $?
LOG=$VENV/install.log
$PIN "$VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1 >"$LOG" 2>&1 || fail "pip install torch torchvision" $? "$LOG"
$PIN "$VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1 ddranking >>"$LOG" 2>&1 || fail "pip install ddranking" $? "$LOG"
$PIN "$VENV/bin/pip" check >>"$LOG" 2>&1 || echo "pip check reports conflicts: $(tail -5 "$LOG")"
$PIN "$VENV/bin/python" -c "
import torch, torchvision, numpy, ddranking
from importlib.metadata import version
print('ddranking', version('ddranking'), 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__)
from ddranking.metrics import AugmentationRobustScore, LabelRobustScoreHard, LabelRobustScoreSoft" \
  || fail "import ddranking" $?

step "2. export $RUN -> $EXPORT"
if [ ! -f "$EXPORT/export.json" ] || [ -n "${DDR_REEXPORT:-}" ]; then
  $PIN .venv/bin/rded export "$RUN" --format ddranking --out "$EXPORT" --overwrite || fail "rded export" $?
fi

step "3. ImageWoof train/val shards -> $DATA/{train,val} (ImageFolder, folder = ImageNet index)"
if [ ! -f "$DATA/.done" ]; then
  rm -rf "$DATA" && $PIN "$VENV/bin/python" benchmarks/ddranking_eval.py prepare "$SHARDS" "$DATA" \
    && touch "$DATA/.done" || fail "prepare data" $?
fi

step "4. DD-Ranking AugmentationRobustScore (hard labels), cpu"
$PIN "$VENV/bin/python" benchmarks/ddranking_eval.py eval "$EXPORT" "$DATA" "$SHARDS" || fail "DD-Ranking evaluation" $?
step "done"
