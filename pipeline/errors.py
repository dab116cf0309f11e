"""The errors a user can fix, and the exit code of each. Library code raises them with a message that names
the setting, path or shard at fault; only the command line turns them into `rded: error: ...` and an exit code.

Exit codes of `rded distill` (the launch files in deploy/ act on them):
- 0: the run is published and every input shard was read whole;
- 2: a bad job or a refused resume (permanent: rerunning the same command cannot help);
- 3: published, but with broken input shards counted as skipped (`data.broken_shards = "skip"`); the
  manifest names each one;
- 74: an I/O error on the output (disk full, read-only, permission): committed work is kept, fix the
  storage and rerun with --resume;
- 75: an input shard could not be read after the retries (a source that is down): committed work is kept,
  rerun with --resume when the source is back;
- 1: a bug (a traceback); 130: Ctrl-C; 143: SIGTERM.
"""

from __future__ import annotations

EXIT_BAD_JOB = 2
EXIT_PUBLISHED_WITH_BROKEN_SHARDS = 3
EXIT_OUTPUT_IO = 74
EXIT_INPUT_UNAVAILABLE = 75


class RdedError(Exception):
    """A problem with what the user gave us, not a bug: one message and `exit_code`."""

    exit_code = EXIT_BAD_JOB


class JobError(RdedError):
    """A bad job: its file, an override, an input path, a weights file. The message names the job key."""


class OptionError(RdedError):
    """A bad setting of a command other than the job file (eval, train-observer, ...). `option` is the
    configuration field; the command line shows it as its flag."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class RunError(RdedError, ValueError):
    """A run directory that cannot be used: no manifest, a foreign or newer format, a shard that does not
    match its recorded sha256."""


class OutputExists(RdedError):
    """The output directory is taken: by a file, or by a finished run that may only be replaced on request."""

    def __init__(self, message: str, *, finished_run: bool = False):
        super().__init__(message)
        self.finished_run = finished_run


class RunLocked(RdedError):
    """Another process holds the output directory (its lock file names it)."""


class InputUnavailable(RdedError):
    """An input shard could not be read after the retries (the source is down or broken); the committed work
    is kept and `--resume` continues when the source is back."""

    exit_code = EXIT_INPUT_UNAVAILABLE


class OutputIOError(RdedError):
    """Writing the output failed (disk full, read-only file system, permission): one line naming the path
    and what to do; the committed work is kept."""

    exit_code = EXIT_OUTPUT_IO


class RankFailed(RdedError):
    """Under torchrun: the main rank failed (a refused start, a failed publish); the other ranks end with its
    exit code and message."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
