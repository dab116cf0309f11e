"""The errors a user can fix. Library code raises them with a message that names the setting at fault; only
the command line turns them into `rded: error: ...` and exit code 2."""

from __future__ import annotations


class RdedError(Exception):
    """A problem with what the user gave us, not a bug: one message, exit code 2."""


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
