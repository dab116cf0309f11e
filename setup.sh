#!/usr/bin/env bash
# Creates .venv at the repository root and installs rded into it from pyproject.toml (idempotent).
#   ./setup.sh              everything: the README's set-up
#   ./setup.sh --deps-only  only what pyproject.toml lists (dependencies, the job and test extras, build requirements);
#                           reads pyproject.toml alone, not the code (the container image's cached layer)
#   ./setup.sh --no-deps    then rded itself, offline, without touching the dependencies
# The two phases together install what the plain ./setup.sh does.
set -euo pipefail
cd "$(dirname "$0")"
MODE="${1:-all}"
case "$MODE" in
  all | --deps-only | --no-deps) ;;
  *) echo "usage: $0 [--deps-only | --no-deps]" >&2; exit 2 ;;
esac
# The dependencies unpack to about 6 GB (torch's CUDA libraries, DALI); pip's wheel cache would hold
# another copy of them, so it is off. Say so up front when the disk cannot take them.
NEEDED_MB=7000
free_mb="$(df -Pm . | awk 'NR==2 {print $4}')"
if [ "$MODE" != "--no-deps" ] && [ ! -x .venv/bin/python ] && [ "${free_mb:-0}" -lt "$NEEDED_MB" ]; then
  echo "setup.sh: warning: ${free_mb} MB free here; the dependencies need about ${NEEDED_MB} MB" >&2
fi
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip's "Location ... is ignored" lines are noise from local mirrors; real errors still stop the script.
pip_install() {
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir "$@" 2>&1 \
    | grep -v "^WARNING: Location" || true
}
case "$MODE" in
  all)
    pip_install -e '.[job,test]'
    ;;
  --deps-only)
    requirements="$(mktemp)"
    trap 'rm -f "$requirements"' EXIT
    .venv/bin/python - >"$requirements" <<'EOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
extras = p["project"]["optional-dependencies"]
print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"] + extras["job"] + extras["test"]))
EOF
    pip_install -r "$requirements"
    .venv/bin/python -c "import torch, nvidia.dali, webdataset" \
      || { echo "setup.sh: the install did not complete" >&2; exit 1; }
    exit 0
    ;;
  --no-deps)
    pip_install --no-deps --no-build-isolation -e .
    ;;
esac
.venv/bin/python -c "import rded, torch, nvidia.dali, webdataset" \
  || { echo "setup.sh: the install did not complete" >&2; exit 1; }
