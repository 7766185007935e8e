"""`dclip-ray presets ...`: the edit presets (named prompt pairs); parse options, call the library."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dclip_ray.config import RunOptions
from dclip_ray.settings import settings_of

from .common import app
from .settings import NO_OPTIONS, run_options
from .terminal import to_stdout

presets_app = typer.Typer(
    help="Edit presets: named CLIP prompt pairs (source -> target) with their recommended t0 and recipe.",
    no_args_is_help=True,
)
app.add_typer(presets_app, name="presets")


@presets_app.command("list")
@run_options("as_json", helps={"as_json": "Print a JSON list instead of a table."})
def list_cmd(
    domain: Annotated[
        str | None, typer.Option("--domain", help="only this domain: face, dog, church, bedroom, imagenet or toy"),
    ] = None,
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Show the edit presets. A prompt-file line holding just a preset name (e.g. `pixar`) expands to it.

    Examples:
      dclip-ray presets list
      dclip-ray presets list --domain dog --json
    """
    from dclip_ray.prompts import list_edit_presets

    presets = list_edit_presets(domain)
    if opts.as_json:
        typer.echo(json.dumps([p.model_dump() for p in presets], indent=2))
        return
    from rich.table import Table

    title = "dclip-ray edit presets" + (f" ({domain})" if domain else "")
    table = Table(title=title)
    table.add_column("name", no_wrap=True)
    table.add_column("domain", no_wrap=True)
    table.add_column("source", overflow="fold")
    table.add_column("target", overflow="fold")
    table.add_column("t0", justify="right", no_wrap=True)
    table.add_column("recipe", no_wrap=True)
    for p in presets:
        table.add_row(p.name, p.domain, p.source, p.target, str(p.t0), p.recipe)
    console = to_stdout(width=160)
    console.print(table)
    console.print(f"{len(presets)} presets; `dclip-ray presets show NAME` for the notes and sources.")


@presets_app.command("show")
@run_options("as_json", helps={"as_json": "Print JSON instead of text."})
def show_cmd(
    name: Annotated[str, typer.Argument(help="preset name, e.g. pixar (see `dclip-ray presets list`)")],
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Show one edit preset in full: prompt pair, base model, notes, and every fine-tuning setting a
    prompt line naming it trains with (its t0 and recipe, the base model preset's, the defaults).

    Example:
      dclip-ray presets show toy_circle_to_square
    """
    from dclip_ray.config import resolve_finetune_config
    from dclip_ray.models import get_preset, is_preset
    from dclip_ray.prompts import get_edit_preset

    p = get_edit_preset(name)
    base = get_preset(p.model) if p.model and is_preset(p.model) else None
    cfg = resolve_finetune_config(p.source, p.target, preset=base, edit_preset=p)
    resolved = {s.prompt: getattr(cfg, s.name) for s in settings_of(type(cfg)) if s.prompt}
    if opts.as_json:
        typer.echo(json.dumps({**p.model_dump(), "settings": resolved}, indent=2))
        return
    t0_from = {"checkpoint": "released checkpoint", "readme": "official README default", "ours": "this project"}[p.t0_from]
    official_id = "" if p.official_id is None else f" (official ArcFace ID weight: {p.official_id:g}, informational)"
    lines = [
        f"name:    {p.name}",
        f"domain:  {p.domain} (base model preset: {p.model or 'none: pass --model'})",
        f"source:  {p.source}",
        f"target:  {p.target}",
        f"t0:      {p.t0} (from: {t0_from})",
        f"recipe:  {p.recipe}{official_id}",
        f"origin:  {p.origin}",
    ]
    if p.notes:
        lines.append(f"notes:   {p.notes}")
    lines.append("settings (a prompt line naming this preset; a key=value on the line beats them):")
    lines.append("  " + " ".join(f"{k}={_value(v)}" for k, v in resolved.items()))
    typer.echo("\n".join(lines))


def _value(v: object) -> str:
    if v is None:
        return "none"
    return f"{v:g}" if isinstance(v, float) else str(v) or "none"


recipes_app = typer.Typer(help="Fine-tuning recipes: named settings for a kind of edit (colour, shape, paper).",
                          no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
@run_options("as_json", helps={"as_json": "Print JSON instead of text."})
def recipes_list(opts: RunOptions = NO_OPTIONS) -> None:
    """Show the recipes: name, what each is for and its settings (prompt-line keys).

    Example:
      dclip-ray recipes list
    """
    from dclip_ray.recipes import list_recipes

    recipes = list_recipes()
    if opts.as_json:
        typer.echo(json.dumps([{"name": r.name, "help": r.help, "tuned_on": r.tuned_on, "settings": r.settings}
                               for r in recipes], indent=2))
        return
    for r in recipes:
        typer.echo(f"{r.name}: " + " ".join(f"{k}={_value(v)}" for k, v in r.settings.items()))
    typer.echo("`dclip-ray recipes show NAME` says what one is for; use it with --recipe NAME or recipe=NAME.")


@recipes_app.command("show")
@run_options("as_json", helps={"as_json": "Print JSON instead of text."})
def recipes_show(
    name: Annotated[str, typer.Argument(help="recipe name, e.g. colour (see `dclip-ray recipes list`)")],
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Show one recipe: what it is for, where its values come from, and its settings.

    Example:
      dclip-ray recipes show shape
    """
    from dclip_ray.config import recipe_settings
    from dclip_ray.recipes import get_recipe

    r = get_recipe(name)
    recipe_settings(name)  # checked by the declared rules
    if opts.as_json:
        typer.echo(json.dumps({"name": r.name, "help": r.help, "tuned_on": r.tuned_on, "settings": r.settings},
                              indent=2))
        return
    typer.echo("\n".join([f"name:     {r.name}", f"for:      {r.help}", f"tuned on: {r.tuned_on}",
                          "settings: " + " ".join(f"{k}={_value(v)}" for k, v in r.settings.items())]))
