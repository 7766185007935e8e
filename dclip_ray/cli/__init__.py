"""`dclip-ray` command line: parses options, builds configs and calls the library (no logic).

Each command family lives in its own module and registers itself on :data:`app`.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import typer

from dclip_ray.errors import EXIT_ABORTED, EXIT_USAGE, DclipError, DclipWarning, Interrupted
from dclip_ray.interrupts import interrupt_handlers
from dclip_ray.urls import redact

from . import apps as _apps  # noqa: F401  (each import registers its commands)
from . import demo as _demo  # noqa: F401
from . import edit as _edit  # noqa: F401
from . import models as _models  # noqa: F401
from . import pipeline as _pipeline  # noqa: F401
from . import presets as _presets  # noqa: F401
from . import toyworld as _toyworld  # noqa: F401
from . import workflow as _workflow  # noqa: F401
from .app import app, keep_epilog_lines

keep_epilog_lines(app)

try:  # newer typer vendors its own copy of click: its exceptions are distinct classes
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover  (older typer uses the click package itself)
    _TyperClickException = click.ClickException

_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, _TyperClickException)

__all__ = ["app", "main"]


EXIT_KEYBOARD_INTERRUPT = 130  # what typer returns for a KeyboardInterrupt it caught itself


def _wants_json(args: list[str]) -> bool:
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def _fail(as_json: bool, code: int, message: str, status: str = "error") -> int:
    """One line ``error: MESSAGE`` on stderr and, for ``--json``, ``{"status", "exit_code", "error"}`` on stdout."""
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
    ``{"status": "error" | "interrupted", "exit_code": N, "error": "..."}`` on stdout.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(args)
    command = typer.main.get_command(app)
    with interrupt_handlers(), _one_line_warnings():
        try:
            rv = command.main(args=args, prog_name="dclip-ray", standalone_mode=False)
        except DclipError as e:  # a secret in a URL never reaches the terminal
            return _fail(as_json, e.exit_code, redact(e))
        except _EXIT as e:
            return int(e.exit_code or 0)
        except Interrupted as e:
            return _interrupted(as_json, e.signame, args)
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
