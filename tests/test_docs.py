"""The documents say what the code does: every job key is documented and every documented key exists, every
test the documents cite exists, the module table lists every module, and every link between documents
resolves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pydantic import BaseModel

from rded.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "shards" / "README.md"]


def text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def job_keys() -> set[str]:
    keys = set()
    for section, field in JobConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            keys |= {f"{section}.{key}" for key in model.model_fields}
    return keys


def documented_keys() -> set[str]:
    """Keys in the first column of a table row: `section.key`, or `section.a` / `b` (another key of the
    section) or / `_b` (a's stem with another ending) for two at once."""
    found = set()
    for section, key, other in re.findall(r"^\| `([a-z_]+)\.([a-z_]+)`(?: / `(_?[a-z_]+)`)? \|", text(), re.M):
        found.add(f"{section}.{key}")
        if other.startswith("_"):
            found.add(f"{section}.{key.rsplit('_', 1)[0]}{other}")
        elif other:
            found.add(f"{section}.{other}")
    return found


def test_every_job_key_is_documented_and_every_documented_key_exists():
    documented = documented_keys()
    undocumented = sorted(job_keys() - documented - {"refine.observers"})  # its rows are [observer]'s keys
    assert not undocumented, f"job keys without a row in the documents: {undocumented}"
    unknown = sorted(k for k in documented - job_keys() if k.split(".")[0] in JobConfig.model_fields)
    assert not unknown, f"documented keys the job does not have: {unknown}"


def test_every_test_the_documents_cite_exists():
    cited = set(re.findall(r"`?(test_\w+\.py)(?:::(test_\w+))?", text()))
    assert len(cited) > 10
    for file, name in cited:
        path = ROOT / "tests" / file
        assert path.is_file(), f"{file} is cited but does not exist"
        if name:
            defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in defined, f"{file}::{name} is cited but does not exist"


def test_the_module_table_lists_every_module():
    table = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\|[^|]*\| `(\w+)`", table, re.M))
    for row in re.findall(r"^\|[^|]*\| (`\w+`(?:, `\w+`)+) \|", table, re.M):
        listed |= set(re.findall(r"`(\w+)`", row))
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py")} - {"__init__", "__main__"}
    assert modules <= listed, f"modules missing from docs/architecture.md: {sorted(modules - listed)}"


def test_links_between_documents_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith("http") and not (doc.parent / target).resolve().is_file():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken
