#!/usr/bin/env bash
# The reader installs beside another torch: a clean virtual environment with an older torch than the job's
# pin installs `rded` alone (numpy, zstandard, Pillow), reads a finished run, and gives the same tensors as
# the full install (.venv). Output: docs/export.md, "The reader alone". Downloads a second torch where pip
# has no copy of it at hand (not part of the test suite for that reason).
#   bash benchmarks/light_reader.sh RUN_DIR [TORCH_VERSION]      (default 2.13.0)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUN="$(cd "${1:?usage: $0 RUN_DIR [TORCH_VERSION]}" && pwd)"
TORCH="${2:-2.13.0}"
VENV="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$VENV")"' EXIT
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "torch==$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
echo "== the reader's environment"
"$VENV/bin/pip" list --format=freeze 2>/dev/null | grep -iE "^(rded|torch|torchvision|numpy|zstandard|pillow|pydantic|nvidia-dali|webdataset)=" || true
DUMP='
import sys, numpy as np, torch
from rded import DistilledDataset
from rded.numpy_reader import RunArrays
ds, out = DistilledDataset(sys.argv[1], temperature=20.0), {}
for epoch in (0, 1, 7):
    ds.set_epoch(epoch)
    for i in range(len(ds)):
        image, soft = ds[i]
        out[f"{epoch}-{i}-image"], out[f"{epoch}-{i}-soft"] = image.numpy(), soft.numpy()
run = RunArrays(sys.argv[1])
out["probabilities"] = np.stack([run.probabilities(i, 3, 20.0) for i in range(len(run))])
np.savez(sys.argv[2], **out)
print(f"torch {torch.__version__}: {len(ds)} images, {len(out)} arrays")
'
"$VENV/bin/python" -c "$DUMP" "$RUN" "$(dirname "$VENV")/light.npz"
"$ROOT/.venv/bin/python" -c "$DUMP" "$RUN" "$(dirname "$VENV")/full.npz"
"$ROOT/.venv/bin/python" - "$(dirname "$VENV")/light.npz" "$(dirname "$VENV")/full.npz" <<'PY'
import sys, numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
assert sorted(a.files) == sorted(b.files)
worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a.files)
same = sum(np.array_equal(a[k], b[k]) for k in a.files)
print(f"== {same} of {len(a.files)} arrays identical; largest difference {worst:.3g}")
PY
