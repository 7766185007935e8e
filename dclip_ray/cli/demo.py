"""`dclip-ray demo`: the main job on the embedded toy world (parse and call)."""

from __future__ import annotations

import typer
from rich.table import Table

from dclip_ray import plain
from dclip_ray.config import RunOptions
from dclip_ray.demo import run_demo

from .common import app
from .settings import NO_OPTIONS, run_options
from .terminal import to_stdout


@app.command(epilog="Example: dclip-ray demo --out demo-out   (CPU, about a minute; what `make demo` runs)")
@run_options("as_json", "quiet", helps={"as_json": "Print the summary as JSON."})
def demo(
    out: str = typer.Option("demo-out", help="Output folder (data, fine-tuned model, edits, grid, summary)."),
    n_train: int = typer.Option(16, help="Training images."),
    n_eval: int = typer.Option(16, help="Held-out images to edit and judge."),
    epochs: int = typer.Option(None, help="Override the demo's epochs."),
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Fine-tune the bundled toy DDPM for "red circle" -> "blue circle", edit held-out images, judge them."""
    summary = run_demo(out, n_train, n_eval, epochs, progress=opts.progress)
    code = 0 if summary["check"].startswith("passed") else 2  # the model failed its check: say so in the code
    if opts.as_json:
        print(plain.dumps(summary))
        raise typer.Exit(code)
    table = Table(title="dclip-ray demo (toy world)", show_header=False)
    for k, v in summary.items():
        table.add_row(k, str(v))
    to_stdout().print(table)
    raise typer.Exit(code)
