"""`dclip-ray toyworld ...` commands (parse options, call the library; no logic)."""

from __future__ import annotations

import typer

from .app import app

toyworld_app = typer.Typer(help="toyworld commands.", no_args_is_help=True)
app.add_typer(toyworld_app, name="toyworld")
