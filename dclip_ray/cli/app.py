"""The typer application object shared by every command module (no logic here)."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="dclip-ray",
    help="DiffusionCLIP at dataset scale: invert, fine-tune per prompt, restyle; local or on a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: '[a, b]' and 'key=value ...' print as written
)


def _version(value: bool) -> None:
    if value:
        from dclip_ray import __version__

        typer.echo(f"dclip-ray {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """DiffusionCLIP at dataset scale: invert, fine-tune per prompt, restyle; local or on a Ray cluster."""


def keep_epilog_lines(typer_app: typer.Typer) -> None:
    """Print every command's epilog (its examples) line by line as written: click would rewrap each
    paragraph, breaking a command line in two (click's ``\\b`` paragraph marker stops it)."""
    commands = list(typer_app.registered_commands)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            commands += group.typer_instance.registered_commands
    for info in commands:
        if info.epilog and "\b" not in info.epilog:
            info.epilog = "\n\n".join("\b\n" + p.strip("\n") for p in info.epilog.split("\n\n") if p.strip())


QUIET_HELP = "No progress bars (they show on a terminal by default; never with --json or off a terminal)."


def progress_wanted(as_json: bool, quiet: bool) -> bool:
    """Progress bars for long work: on a terminal (stderr), unless ``--quiet`` or ``--json``."""
    return not (as_json or quiet) and sys.stderr.isatty()
