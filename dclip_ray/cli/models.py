"""`dclip-ray models ...` commands (parse options, call the library; no logic)."""

from __future__ import annotations

import typer

from .app import app

models_app = typer.Typer(help="models commands.", no_args_is_help=True)
app.add_typer(models_app, name="models")
