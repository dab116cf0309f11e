"""The `rded` command: distill, slice, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import JobError, load_job

EXIT_BAD_JOB = 2


def _err(msg: str) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
    print(f"rded: error{where}: {msg}", file=sys.stderr)
    return EXIT_BAD_JOB


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import run_distill

    job = load_job(args.job, args.set)
    summary = run_distill(job, Path(args.out), overwrite=args.overwrite)
    print(f"rded: done: {summary.line()}")
    return 0


def cmd_slice(args: argparse.Namespace) -> int:
    from .write import slice_distilled

    src = Path(args.dir)
    if not (src / "manifest.json").is_file():
        return _err(f"{src}: no manifest.json (not a finished rded run)")
    try:
        m = slice_distilled(src, args.ipc, Path(args.out), overwrite=args.overwrite)
    except (ValueError, FileExistsError) as e:
        return _err(str(e))
    print(f"rded: done: IPC {args.ipc}: {m['images']} images in {len(m['shards'])} shards -> {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), seconds=args.train_seconds)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    run_eval(args)
    return 0


def cmd_train_observer(args: argparse.Namespace) -> int:
    from .evaluate import run_train_observer

    run_train_observer(args)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(args.job, args.set, Path(args.out), reference=not args.no_reference)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rded", description="RDED dataset distillation on WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="distil a data set as the job file says")
    p.add_argument("job", help="job file (TOML)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job-file value (repeatable); VALUE is read as TOML, else as a string")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("slice", help="the IPC=K set of a larger run, without recomputation")
    p.add_argument("dir", help="a finished run")
    p.add_argument("--ipc", type=int, required=True, help="one of the run's tiers (see its manifest)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_slice)

    p = sub.add_parser("eval", help="train a student on a distilled run and report validation accuracy")
    p.add_argument("--distilled", required=True, help="a finished run or slice")
    p.add_argument("--val", required=True, action="append", help="validation shard path or brace pattern")
    p.add_argument("--student", default="resnet18", help="torchvision classification model name")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--resolution", type=int, default=None, help="training and validation side (default: the run's S)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the authors' (10/50/100 at IPC 1/10/50)")
    p.add_argument("--lr", type=float, default=None, help="default: the authors' for the student family")
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--schedule", choices=["cosine", "authors"], default="cosine",
                   help="cosine: to 0; authors: their code's cosine that ends at 0.5x")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--teacher-online", action="store_true", help="label every mixed batch with the observer")
    group.add_argument("--hard-labels", action="store_true", help="train on class labels (cross-entropy)")
    p.add_argument("--job", default=None, help="the job file whose observer --teacher-online runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the result JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train-observer", help="train a classifier on full training shards, to use as an observer")
    p.add_argument("--train", required=True, action="append", help="training shard path or brace pattern")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--arch", default="resnet18", help="torchvision classification model name")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--val", action="append", default=None, help="validation shards to report accuracy on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True, help="where the state dict goes")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_observer)

    p = sub.add_parser("bench", help="time the job's stages against a reference-style baseline and the observer alone")
    p.add_argument("job", help="job file (TOML)")
    p.add_argument("--out", required=True, help="working directory for the runs and bench.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-style baseline")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the whole job on built-in synthetic data (no data or network needed)")
    p.add_argument("--out", default="rded-demo", help="where the demo's data and outputs go (default: rded-demo)")
    p.add_argument("--train-seconds", type=float, default=60.0, help="observer training time")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: its failure summary gets our traceback
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    from .runtime import exit_cleanly_on_sigterm, keep_large_allocations

    args = build_parser().parse_args(argv)
    keep_large_allocations()
    exit_cleanly_on_sigterm()
    try:
        return args.func(args)
    except JobError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        print("rded: interrupted; no finished output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
