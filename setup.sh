#!/usr/bin/env bash
# Creates .venv at the repository root and installs rded into it from pyproject.toml (idempotent).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's "Location ... is ignored" lines are noise from local mirrors; real errors still stop the script.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import rded, torch, nvidia.dali, webdataset" \
  || { echo "setup.sh: the install did not complete" >&2; exit 1; }
