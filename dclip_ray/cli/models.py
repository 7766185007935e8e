"""`dclip-ray models ...` and `dclip-ray convert` (parse options, call the library; no logic)."""

from __future__ import annotations

from typing import Annotated

import typer

from dclip_ray.config import RunOptions

from .common import app
from .settings import NO_OPTIONS, run_options
from .terminal import to_stdout

models_app = typer.Typer(help="Model presets (UNet and CLIP) and where to get their checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
@run_options("as_json", helps={"as_json": "Print the presets as JSON."})
def list_cmd(opts: RunOptions = NO_OPTIONS) -> None:
    """Show the model presets, with where to get each checkpoint."""
    import json

    from rich.table import Table

    from dclip_ray.models import get_preset, list_presets

    if opts.as_json:
        rows = []
        for name in list_presets():
            p = get_preset(name)
            rows.append({"name": name, "kind": p.kind, "format": p.format, "resolution": p.resolution, "t0": p.t0,
                         "recommended_clip": p.recommended_clip, "face_loss": bool(p.face_loss),
                         "source": p.source.text, "url": p.source.url})
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="dclip-ray model presets", show_lines=True)
    for col in ("name", "kind", "format", "res", "t0", "clip", "face", "checkpoint: where to get it"):
        table.add_column(col, overflow="fold")
    for name in list_presets():
        p = get_preset(name)
        where = p.source.text + (f"\n{p.source.url}" if p.source.url else "")
        fmt = p.format or (p.architecture.get("model_name", "") if p.kind == "clip" else "")
        table.add_row(
            name, p.kind, fmt, str(p.resolution or ""), str(p.t0 or ""), p.recommended_clip or "",
            "yes" if p.face_loss else "", where,
        )
    to_stdout(width=160).print(table)


@app.command("convert")
@run_options("preset", "trust_checkpoint", helps={
    "preset": "Architecture preset name or preset .yaml (see `dclip-ray models list`)."})
def convert_cmd(
    src: Annotated[str, typer.Argument(help="checkpoint: ddim-format .ckpt, ADM .pt, .safetensors, or a diffusers folder / URL")],
    out: Annotated[str, typer.Option("--out", help="output folder (new or empty): diffusers UNet2DModel + scheduler_config.json")],
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Convert a UNet checkpoint into a diffusers folder that plain `UNet2DModel.from_pretrained` loads."""
    from dclip_ray.models import convert_checkpoint

    path = convert_checkpoint(src, opts.preset, out, trust_checkpoint=opts.trust_checkpoint)
    typer.echo(f"wrote {path}")
