"""The typer application object shared by every command module (no logic here)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="dclip-ray",
    help="DiffusionCLIP at dataset scale: invert, fine-tune per prompt, restyle; local or on a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
