"""rded: RDED dataset distillation as a streaming batch job.

    from rded import DistilledDataset          # a finished run's images with their stored soft labels
    from rded import load_job, run_distill     # run a job from Python

The names below load on first use, so `import rded` (and the loader) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "DistilledDataset": "loader",
    "load_job": "config",
    "JobConfig": "config",
    "run_distill": "distill",
    "Summary": "distill",
    "slice_run": "rundir",
    "read_manifest": "rundir",
    "verify_run": "rundir",
    "Manifest": "rundir",
    "RdedError": "errors",
    "JobError": "errors",
    "RunError": "errors",
    "register_observer": "observer",
}
__all__ = ["__version__", *_WHERE]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'rded' has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE[name]}", __name__)
    return getattr(module, "register" if name == "register_observer" else name)
