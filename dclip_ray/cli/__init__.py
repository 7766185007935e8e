"""`dclip-ray` command line: parses options, builds configs and calls the library (no logic).

Each command family lives in its own module and registers itself on :data:`app`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import typer

from dclip_ray.errors import EXIT_USAGE, DclipError, DclipWarning
from dclip_ray.urls import redact

from . import apps as _apps  # noqa: F401  (each import registers its commands)
from . import demo as _demo  # noqa: F401
from . import edit as _edit  # noqa: F401
from . import models as _models  # noqa: F401
from . import pipeline as _pipeline  # noqa: F401
from . import presets as _presets  # noqa: F401
from . import toyworld as _toyworld  # noqa: F401
from . import workflow as _workflow  # noqa: F401
from .app import app

try:  # newer typer vendors its own copy of click: its exceptions are distinct classes
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover  (older typer uses the click package itself)
    _TyperClickException = click.ClickException

_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, _TyperClickException)

__all__ = ["app", "main"]


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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the process exit code.

    Library errors (:class:`DclipError`) print one line ``error: ...`` on stderr and map to their
    exit code; click usage errors map to exit code 1 (configuration error, nothing started).
    """
    command = typer.main.get_command(app)
    try:
        with _one_line_warnings():
            rv = command.main(args=argv, prog_name="dclip-ray", standalone_mode=False)
    except DclipError as e:
        print(f"error: {redact(e)}", file=sys.stderr)  # a secret in a URL never reaches the terminal
        return e.exit_code
    except _EXIT as e:
        return int(e.exit_code or 0)
    except _ABORT:
        print("error: aborted", file=sys.stderr)
        return 3
    except _USAGE as e:
        e.show()
        return EXIT_USAGE
    return int(rv) if isinstance(rv, int) else 0
