"""The `rded` command. Each subcommand turns its flags into typed settings and calls the library; this is
the only place where errors become messages and exit codes (2 for anything the user can fix)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import EXIT_BAD_JOB, EXIT_PUBLISHED_WITH_BROKEN_SHARDS, OptionError, OutputExists, RdedError

try:  # the job's packages are the extra rded[job]: without them, `main` says what to install
    from .config import (BenchConfig, DemoConfig, EvalConfig, SliceConfig, TrainObserverConfig, command_config,
                         load_job)
except ModuleNotFoundError:
    pass

# what the commands import (`pip install "rded[job]"`); the reader needs none of them
JOB_MODULES = ("pydantic", "torch", "torchvision", "nvidia.dali", "webdataset", "tqdm", "braceexpand")


def missing_job_modules() -> list[str]:
    import importlib.util

    missing = []
    for name in JOB_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or the module blocked
            found = False
        if not found:
            missing.append(name)
    return missing


def _err(msg: str, code: int = EXIT_BAD_JOB) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
    print(f"rded: error{where}: {msg}", file=sys.stderr)
    return code


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import check_run, run_distill

    job = load_job(args.job, args.set)
    if args.check:
        decision = check_run(job, Path(args.out), overwrite=args.overwrite, resume=args.resume)
        print(f"rded: check: ok: {CHECK_OUTCOMES[decision]}")
        # a finished run that skipped broken shards says so here too: the launch files stop on the check
        finished_broken = decision == "finished" and finished_manifest(Path(args.out)).broken_shards
        return EXIT_PUBLISHED_WITH_BROKEN_SHARDS if finished_broken else 0
    summary = run_distill(job, Path(args.out), overwrite=args.overwrite, resume=args.resume)
    if summary is None:  # a finished run of this job: it says again whether it skipped broken shards
        return EXIT_PUBLISHED_WITH_BROKEN_SHARDS if finished_manifest(Path(args.out)).broken_shards else 0
    print(f"rded: done: {summary.line()}")
    return EXIT_PUBLISHED_WITH_BROKEN_SHARDS if summary.broken_shards else 0


def finished_manifest(out: Path):
    """The finished run's manifest (the staged one when a publish was interrupted: what a start publishes)."""
    from .rundir import MANIFEST, STAGING, read_manifest

    staged = out / STAGING
    return read_manifest(staged if (staged / MANIFEST).is_file() else out)


CHECK_OUTCOMES = {"fresh": "the run would start", "resume": "the unfinished run would continue",
                  "finished": "the run has finished; nothing to do"}


def cmd_slice(args: argparse.Namespace) -> int:
    from .rundir import slice_run

    cfg = command_config(SliceConfig, {"run": args.dir, "ipc": args.ipc, "out": args.out,
                                       "overwrite": args.overwrite})
    m = slice_run(cfg.run, cfg.ipc, cfg.out, overwrite=cfg.overwrite)
    print(f"rded: done: IPC {cfg.ipc}: {m.images} images in {len(m.shards)} shards -> {cfg.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .config import ExportConfig
    from .export import export_run

    cfg = command_config(ExportConfig, {"run": args.dir, "format": args.format, "out": args.out,
                                        "overwrite": args.overwrite})
    record = export_run(cfg.run, cfg.format, cfg.out, overwrite=cfg.overwrite)
    images = sum(c["images"] for c in record["classes"])
    print(f"rded: done: {cfg.format}: {images} images of {len(record['classes'])} classes -> {cfg.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    labels = "online" if args.teacher_online else "hard" if args.hard_labels else "stored"
    fields = ("distilled", "val", "student", "epochs", "resolution", "batch_size", "lr", "temperature", "schedule",
              "teacher_job", "seed", "workers", "device", "precision", "out", "checkpoint", "checkpoint_every",
              "best_of_per_class")
    values = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    run_eval(command_config(EvalConfig, {**values, "labels": labels, "resume": args.resume,
                                         "progress": not args.quiet}))
    return 0


def cmd_train_observer(args: argparse.Namespace) -> int:
    from .evaluate import run_train_observer

    fields = ("train", "num_classes", "arch", "epochs", "resolution", "batch_size", "lr", "val", "seed", "workers",
              "device", "precision", "out")
    values = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    run_train_observer(command_config(TrainObserverConfig, {**values, "progress": not args.quiet}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    values = {"job": args.job, "overrides": args.set, "out": args.out, "reference": not args.no_reference}
    if args.precision:
        values["precisions"] = args.precision
    run_bench(command_config(BenchConfig, values))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(command_config(DemoConfig, {"out": args.out, "train_steps": args.train_steps}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rded", description="RDED dataset distillation on WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    _distill_parser(sub)

    p = sub.add_parser("slice", help="the IPC=K set of a larger run, without recomputation")
    p.add_argument("dir", help="a finished run")
    p.add_argument("--ipc", type=int, required=True, help="one of the run's tiers (see its manifest)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_slice, command_parser=p)

    _export_parser(sub)

    p = sub.add_parser("eval", help="train a student on a distilled run and report validation accuracy")
    p.add_argument("--distilled", required=True, help="a finished run or slice")
    p.add_argument("--val", required=True, action="append",
                   help="validation shard path or brace pattern; repeat it to join several")
    p.add_argument("--student", default=None, help="torchvision classification model name (default resnet18)")
    p.add_argument("--epochs", type=int, default=None, help="default 300")
    p.add_argument("--resolution", type=int, default=None, help="training and validation side (default: the run's S)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the authors' (10/50/100 at IPC 1/10/50)")
    p.add_argument("--lr", type=float, default=None, help="default: the authors' for the student family")
    p.add_argument("--temperature", type=float, default=None, help="default 20")
    p.add_argument("--schedule", choices=["cosine", "authors"], default=None,
                   help="cosine (default): to 0; authors: their code's cosine that ends at 0.5x")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--teacher-online", action="store_true", help="label every mixed batch with the observer")
    group.add_argument("--hard-labels", action="store_true", help="train on class labels (cross-entropy)")
    p.add_argument("--job", dest="teacher_job", default=None, help="the job file whose observer --teacher-online runs")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default 2)")
    _compute_flags(p)
    p.add_argument("--out", default=None, help="also write the result JSON here")
    p.add_argument("--checkpoint", default=None,
                   help="training checkpoint file (student, optimiser, RNG, epoch); default: --out with suffix .ckpt")
    p.add_argument("--checkpoint-every", type=int, default=None, help="epochs between checkpoints (default 10)")
    p.add_argument("--resume", action="store_true",
                   help="continue the training in the checkpoint (the same settings); start one when there is none")
    p.add_argument("--best-of-per-class", type=int, default=None,
                   help="val images per class for the authors' best-of checks (default 50; 0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval, command_parser=p)

    p = sub.add_parser("train-observer", help="train a classifier on full training shards, to use as an observer")
    p.add_argument("--train", required=True, action="append", help="training shard path or brace pattern")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--arch", default=None, help="torchvision classification model name (default resnet18)")
    p.add_argument("--epochs", type=int, default=None, help="default 30")
    p.add_argument("--resolution", type=int, default=None, help="default 224")
    p.add_argument("--batch-size", type=int, default=None, help="default 64")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--val", action="append", default=None, help="validation shards to report accuracy on")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    _compute_flags(p)
    p.add_argument("--out", required=True, help="where the state dict goes")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_observer, command_parser=p)

    p = sub.add_parser("bench", help="time the job's stages against a reference-style baseline and the observer alone")
    p.add_argument("job", help="job file (TOML)")
    p.add_argument("--out", required=True, help="working directory for the runs and bench.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-style baseline")
    p.add_argument("--precision", action="append", choices=["auto", "fp32", "bf16"], default=None,
                   help="run the job and the ceiling in this precision (repeatable; default: fp32 and auto)")
    p.set_defaults(func=cmd_bench, command_parser=p)

    p = sub.add_parser("demo", help="the whole job on built-in synthetic data (no data or network needed)")
    p.add_argument("--out", default="rded-demo", help="where the demo's data and outputs go (default: rded-demo)")
    p.add_argument("--train-steps", type=int, default=DemoConfig.model_fields["train_steps"].default,
                   help="observer training steps (default: %(default)s, about a minute on 2 cores)")
    p.set_defaults(func=cmd_demo, command_parser=p)
    return parser


def _distill_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a data set as the job file says")
    p.add_argument("job", help="job file (TOML)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job-file value (repeatable); VALUE is read as TOML, else as a string")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished (killed or failed) run in --out from its committed work; runs "
                        "the job when none was started; does nothing when the run has finished")
    p.add_argument("--check", action="store_true",
                   help="only check the job, the output directory and (with --resume) the run it would continue, "
                        "then exit: 0 when the run can start or continue, 2 naming the problem; launch files run "
                        "it before torchrun so that a bad job fails once, not once per restart")
    p.set_defaults(func=cmd_distill, command_parser=p)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a finished run or slice as an image folder, DD-Ranking tensors or .npy labels")
    p.add_argument("dir", help="a finished run or slice")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="imagefolder (torchvision ImageFolder), ddranking (.pt tensors) or arrays (.npy view labels "
                        "as WebDataset tars); see docs/export.md")
    p.add_argument("--out", required=True, help="an absent or empty directory")
    p.add_argument("--overwrite", action="store_true", help="replace the previous export in --out (only its files)")
    p.set_defaults(func=cmd_export, command_parser=p)


def _compute_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default auto: CUDA when present")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="of every model call (as the job key runtime.precision); default auto: bf16 where the "
                        "hardware has native bf16, else fp32")


def _flag(command: argparse.ArgumentParser, option: str) -> str:
    """The flag of a settings field (e.g. teacher_job -> --job), for error messages."""
    for action in command._actions:
        if action.dest == option and action.option_strings:
            return action.option_strings[0]
    return option


def main(argv: list[str] | None = None) -> int:
    if missing := missing_job_modules():
        return _err(f"the job's packages are not installed ({', '.join(missing)} missing): pip install \"rded[job]\" "
                    "(the reader alone, rded.numpy_reader and rded.DistilledDataset, needs none of them)")
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
    except OptionError as e:
        return _err(f"{_flag(args.command_parser, e.option)}: {e.message}")
    except OutputExists as e:
        return _err(f"{e}; pass --overwrite to replace it" if e.finished_run else str(e))
    except RdedError as e:
        return _err(str(e), e.exit_code)
    except KeyboardInterrupt:
        print("rded: interrupted; no finished output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
