"""Error types with the exit codes of the DESIGN contract.

0 all done; 1 usage / configuration error (nothing started); 2 finished with per-item errors;
3 aborted (retry by re-running the same command).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_ITEM_ERRORS = 2
EXIT_ABORTED = 3


class DclipError(Exception):
    """Base class: a one-line, user-facing message naming the input and the fix."""

    exit_code: int = EXIT_USAGE


class ConfigError(DclipError, ValueError):
    """Bad arguments, bad config, bad spec or prompt file: nothing was started (exit code 1)."""

    exit_code = EXIT_USAGE


class InputFileError(DclipError, ValueError):
    """A file or URL that is missing, unreadable or of the wrong format (exit code 1)."""

    exit_code = EXIT_USAGE


class AbortedError(DclipError, RuntimeError):
    """The run stopped before finishing; re-running the same command resumes it (exit code 3)."""

    exit_code = EXIT_ABORTED


class DclipWarning(UserWarning):
    """A notice the user should see but that stops nothing; the CLI prints it as one line ``warning: ...``."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run; re-running the same command resumes it (exit code 3).

    A ``BaseException`` like ``KeyboardInterrupt`` (no ``except Exception`` swallows it) but not one: the
    CLI framework turns a ``KeyboardInterrupt`` into a bare exit 130. ``signame``: ``"SIGINT"`` or ``"SIGTERM"``.
    """

    exit_code: int = EXIT_ABORTED

    def __init__(self, signame: str = "SIGINT") -> None:
        super().__init__(signame)
        self.signame = signame
