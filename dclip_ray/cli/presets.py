"""`dclip-ray presets ...`: the edit presets (named prompt pairs); parse options, call the library."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .app import app

presets_app = typer.Typer(
    help="Edit presets: named CLIP prompt pairs (source -> target) with their recommended t0 and loss weights.",
    no_args_is_help=True,
)
app.add_typer(presets_app, name="presets")


@presets_app.command("list")
def list_cmd(
    domain: Annotated[
        str | None, typer.Option("--domain", help="only this domain: face, dog, church, bedroom, imagenet or toy"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list instead of a table")] = False,
) -> None:
    """Show the edit presets. A prompt-file line holding just a preset name (e.g. `pixar`) expands to it.

    Examples:
      dclip-ray presets list
      dclip-ray presets list --domain dog --json
    """
    from dclip_ray.prompts import list_edit_presets

    presets = list_edit_presets(domain)
    if as_json:
        typer.echo(json.dumps([p.model_dump() for p in presets], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    title = "dclip-ray edit presets" + (f" ({domain})" if domain else "")
    table = Table(title=title)
    table.add_column("name", no_wrap=True)
    table.add_column("domain", no_wrap=True)
    table.add_column("source", overflow="fold")
    table.add_column("target", overflow="fold")
    for col in ("t0", "clip", "l1", "id"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in presets:
        table.add_row(p.name, p.domain, p.source, p.target, str(p.t0), f"{p.clip:g}", f"{p.l1:g}", f"{p.id:g}")
    console = Console(width=160)
    console.print(table)
    console.print(f"{len(presets)} presets; `dclip-ray presets show NAME` for the notes and sources.")


@presets_app.command("show")
def show_cmd(
    name: Annotated[str, typer.Argument(help="preset name, e.g. pixar (see `dclip-ray presets list`)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of text")] = False,
) -> None:
    """Show one edit preset in full: prompt pair, recommended t0 and loss weights, base model, notes.

    Example:
      dclip-ray presets show grey_hair
    """
    from dclip_ray.prompts import get_edit_preset

    p = get_edit_preset(name)
    if as_json:
        typer.echo(json.dumps(p.model_dump(), indent=2))
        return
    t0_from = {"checkpoint": "released checkpoint", "readme": "official README default", "ours": "this project"}[p.t0_from]
    official_id = "" if p.official_id is None else f" (official ArcFace weight: {p.official_id:g}, informational)"
    lines = [
        f"name:    {p.name}",
        f"domain:  {p.domain} (base model preset: {p.model})",
        f"source:  {p.source}",
        f"target:  {p.target}",
        f"t0:      {p.t0} (from: {t0_from})",
        f"weights: clip {p.clip:g}, l1 {p.l1:g}, id {p.id:g}{official_id}",
        f"origin:  {p.origin}",
    ]
    if p.notes:
        lines.append(f"notes:   {p.notes}")
    typer.echo("\n".join(lines))
