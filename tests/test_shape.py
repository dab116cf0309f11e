"""The code's shape: no import cycles, layers import only downward, the loader stays light, the public API
resolves, and adding an observer is one registered function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Each module's layer: a module may import modules of its own layer or below, never above.
LAYERS = [
    {"errors", "keyed", "records", "grid", "geometry", "normalization", "tario", "streams", "labels", "heap", "models",
     "runtime"},
    {"config", "rundir", "report", "dist", "checkpoint", "staging", "cards"},
    {"source", "select", "crops", "observer", "score", "write", "refine", "bnstats", "relabel", "loader",
     "numpy_reader", "synthetic", "train"},
    {"distill"},
    {"evaluate", "bench", "demo", "export"},
    {"cli", "__main__", "__init__"},
]
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def imports_of(module: str) -> set[str]:
    """The package modules `module` imports, at the top or inside functions (a lazy import is a dependency too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "rded":
                names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("rded."))
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()} - {module}


def graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p.stem) for p in sorted(PACKAGE.glob("*.py"))}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_the_cycle_finder_finds_a_cycle():
    # the check above must be able to fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer_and_imports_only_downward():
    g = graph()
    assert set(g) == set(LAYER_OF), f"unplaced modules: {set(g) ^ set(LAYER_OF)}"
    upward = [(m, n) for m, deps in g.items() for n in deps if LAYER_OF[n] > LAYER_OF[m]]
    assert not upward, f"imports from a higher layer: {upward}"


LIGHT = r'''
import sys
import numpy, PIL.Image, torch, zstandard
before = set(sys.modules)
import rded.loader
from rded import DistilledDataset
new = {m.split(".")[0] for m in set(sys.modules) - before}
print(sorted(new - set(sys.stdlib_module_names) - {"rded"}))
'''


def test_loader_imports_only_numpy_zstandard_torch_and_pillow():
    proc = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_public_api_resolves():
    import rded

    for name in rded.__all__:
        assert getattr(rded, name) is not None, name
    with pytest.raises(AttributeError):
        rded.no_such_name  # noqa: B018


def test_an_observer_is_one_registered_function(tmp_path, write_job, data_dir):
    """A new observer kind: one decorated factory, then usable from a job file like the built-in ones."""
    import torch

    from rded.config import load_job
    from rded.distill import run_distill
    from rded.normalization import IMAGENET
    from rded.observer import REGISTRY, register
    from rded.synthetic import SmallCNN

    @register("tiny-cnn-test", normalization=IMAGENET, input_size=32)
    def tiny_cnn(cfg, weights):
        torch.manual_seed(0)
        return SmallCNN(cfg.num_outputs or 3, width=8)

    try:
        job = write_job(observer={"kind": "tiny-cnn-test", "num_outputs": 3})
        summary = run_distill(load_job(job), tmp_path / "out")
        assert summary.images == 3 * 2
    finally:
        del REGISTRY["tiny-cnn-test"]


def test_unknown_observer_kind_is_a_bad_job(write_job, tmp_path, capsys):
    from rded.cli import main

    assert main(["distill", str(write_job(observer={"kind": "resnet-9000"})), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "observer.kind: unknown observer 'resnet-9000'" in err and "efficientnet-lite0" in err


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_the_architecture_allows():
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.stem}.{node.name}: {lines} lines")
    assert not long, long
