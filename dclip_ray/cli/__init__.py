"""`dclip-ray` command line: parses options, builds configs and calls the library (no logic).

Each command family lives in its own module and registers itself on :data:`app`.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import typer

from dclip_ray.errors import EXIT_ABORTED, EXIT_USAGE, DclipError, DclipWarning, InputFileError, Interrupted
from dclip_ray.interrupts import interrupt_handlers
from dclip_ray.urls import is_url, redact

from .common import app as _app
from .common import keep_epilog_lines
from .terminal import drain_native_logs, filter_native_logs

try:  # newer typer vendors its own copy of click: its exceptions are distinct classes
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover  (older typer uses the click package itself)
    _TyperClickException = click.ClickException

_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, _TyperClickException)

__all__ = ["app", "main", "run"]

INPUT_OPTIONS = ("--images", "--input", "--finetuned", "--mix", "--before", "--after")
"""Options that name an existing input on every command that has them: a local path among them that
does not exist is refused before the commands (and torch) are imported."""

_registered = False


def _commands() -> typer.Typer:
    """The application with every command registered (importing the command modules, and through them
    torch, takes a few seconds: done after :func:`check_local_inputs`)."""
    global _registered
    if not _registered:
        from . import apps, demo, edit, models, pipeline, presets, toyworld, workflow  # noqa: F401  (each registers)

        keep_epilog_lines(_app)
        _registered = True
    return _app


def __getattr__(name: str) -> Any:  # ``from dclip_ray.cli import app``: the app with its commands
    if name == "app":
        return _commands()
    raise AttributeError(name)


def check_local_inputs(args: list[str]) -> None:
    """Refuse at once (:class:`InputFileError`, exit 1, naming the option as typed) a local path given to
    one of :data:`INPUT_OPTIONS` that does not exist. URLs, globs and brace lists are left to the command."""
    if "--help" in args:
        return
    for i, a in enumerate(args):
        if a == "--":
            break
        opt, _, value = a.partition("=")
        if opt not in INPUT_OPTIONS:
            continue
        if not value and a == opt:
            value = args[i + 1] if i + 1 < len(args) else ""
        if value and not is_url(value) and not any(c in value for c in "*?[{") and not os.path.exists(value):
            raise InputFileError(f"{opt} {value}: no such file or folder; check the path")


EXIT_KEYBOARD_INTERRUPT = 130  # what typer returns for a KeyboardInterrupt it caught itself


def _wants_json(args: list[str]) -> bool:
    return "--json" in (args[: args.index("--")] if "--" in args else args)


MAX_MESSAGE = 2000
"""The longest error message printed: a message echoing a huge value is cut (its start says what is wrong)."""


def _fail(as_json: bool, code: int, message: str, status: str = "error") -> int:
    """One line ``error: MESSAGE`` on stderr and, for ``--json``, ``{"status", "exit_code", "error"}`` on stdout
    (both cut to :data:`MAX_MESSAGE` characters, newlines made spaces)."""
    message = " ".join(str(message).split("\n"))
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 40] + f" ... ({len(message):,} characters, cut)"
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"status": status, "exit_code": code, "error": message}))
    return code


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show each :class:`DclipWarning` once, as one line ``warning: ...`` on stderr (others as Python does)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.simplefilter("default", DclipWarning)

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, DclipWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def _interrupted(as_json: bool, signame: str, args: list[str] | None = None) -> int:
    args = args or []
    if args[:1] == ["finetune"] and not any(a.split("=")[0] == "--checkpoint-dir" for a in args):
        # nothing of a finetune is on disk before its model is saved: a re-run starts over
        return _fail(as_json, EXIT_ABORTED, f"interrupted ({signame}); nothing was saved (no --checkpoint-dir): a "
                     "re-run starts from the first step; pass --checkpoint-dir DIR to resume next time",
                     "interrupted")
    return _fail(as_json, EXIT_ABORTED, f"interrupted ({signame}); re-run the same command to resume", "interrupted")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the process exit code.

    Library errors (:class:`DclipError`) print one line ``error: ...`` on stderr and map to their
    exit code; click usage errors map to exit code 1 (configuration error, nothing started). SIGINT
    (Ctrl-C) and SIGTERM print ``error: interrupted (SIGINT); re-run the same command to resume`` and
    give exit code 3 (aborted, a re-run resumes; a `finetune` without ``--checkpoint-dir`` says instead that
    nothing was saved and how to keep it next time). With ``--json`` every one of these failures also prints
    ``{"status": "error" | "interrupted", "exit_code": N, "error": "..."}`` on stdout. Run as the
    ``dclip-ray`` process (``argv`` None), Ray's native log lines are kept off stderr unless ``--verbose``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(args)
    if argv is None and "--verbose" not in args:  # the process is ours (the console script): a terminal or a log
        filter_native_logs(force=True)
    with interrupt_handlers(), _one_line_warnings():
        try:
            check_local_inputs(args)
            command = typer.main.get_command(_commands())
            rv = command.main(args=args, prog_name="dclip-ray", standalone_mode=False)
        except DclipError as e:  # a secret in a URL never reaches the terminal
            return _fail(as_json, e.exit_code, redact(e))
        except _EXIT as e:
            return int(e.exit_code or 0)
        except Interrupted as e:
            return _interrupted(as_json, e.signame, args)
        except OSError as e:  # the disk or the store failed (full, read-only, gone) where no step caught it
            return _fail(as_json, EXIT_ABORTED, f"{redact(f'{type(e).__name__}: {e}')}; what was committed is kept: fix the cause "
                         "(disk space, permissions, the path) and re-run the same command to resume")
        except _ABORT:
            return _fail(as_json, EXIT_ABORTED, "aborted; re-run the same command to resume")
        except _USAGE as e:
            e.show()
            if as_json:
                print(json.dumps({"status": "error", "exit_code": EXIT_USAGE, "error": e.format_message()}))
            return EXIT_USAGE
    if rv == EXIT_KEYBOARD_INTERRUPT:  # a KeyboardInterrupt our handlers did not raise (not the main thread)
        return _interrupted(as_json, "SIGINT", args)
    return int(rv) if isinstance(rv, int) else 0


def run() -> None:
    """The ``dclip-ray`` console script: :func:`main`, then :func:`exit_now` with its exit code."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with ``code`` once our work is safe, without the interpreter's native teardown.

    Run, in the interpreter's own order: the wait for non-daemon threads (and thread pools' exit), the
    ``atexit`` hooks (Ray's shutdown of a local Ray, logging's flush), a flush of stdout and stderr, the
    native-log filter drained; then ``os._exit``. What is skipped is the teardown of native
    libraries' static objects (torch, pyarrow, Ray's core worker, gRPC), where a thread still joinable
    ends the process with ``terminate called without an active exception`` and exit 134 after the
    summary was printed (seen about once in 45 `edit` runs). Every file we write is closed by then:
    writers are context managers and commit by rename.
    """
    try:
        import threading

        threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter does first: wait for non-daemon threads
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`| head`) or a closed stream
                pass
        drain_native_logs()
        os._exit(code)
