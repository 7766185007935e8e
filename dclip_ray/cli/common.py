"""The typer application object shared by every command module (no logic here)."""

from __future__ import annotations

import sys

import typer

HELP_WIDTH = 120
"""The widest help text (click's default, 80, cuts the command summaries); also the width off a terminal."""

app = typer.Typer(
    name="dclip-ray",
    help="DiffusionCLIP at dataset scale: invert, fine-tune per prompt, restyle; local or on a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: '[a, b]' and 'key=value ...' print as written
    # click formats help for 80 columns off a terminal (a pager, a file), cutting each command's summary
    context_settings={"max_content_width": HELP_WIDTH, **({} if sys.stdout.isatty() else {"terminal_width": HELP_WIDTH})},
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


SHORT_HELP = 100
"""The longest command summary in a command list that click prints whole at :data:`HELP_WIDTH`."""


def short_help(text: str) -> str | None:
    """A command's summary for the command list: its first sentence when it fits in :data:`SHORT_HELP`,
    else that sentence up to its last ';' or ':' that fits (click would cut it mid-phrase with '...', or
    at an abbreviation's period); None to leave it to click."""
    first = " ".join(text.split("\n\n")[0].split())
    sentence = first.split(". ")[0].rstrip(".")
    if len(sentence) <= SHORT_HELP:
        return sentence
    cut = max(sentence.rfind(sep, 0, SHORT_HELP) for sep in ("; ", ": "))
    return sentence[:cut] if cut > 0 else None


def keep_epilog_lines(typer_app: typer.Typer) -> None:
    """Print every command's epilog (its examples) line by line as written: click would rewrap each
    paragraph, breaking a command line in two (click's ``\\b`` paragraph marker stops it); and give each
    command a :func:`short_help` summary that the command list prints whole."""
    import inspect

    commands = list(typer_app.registered_commands)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            commands += group.typer_instance.registered_commands
    for info in commands:
        if info.epilog and "\b" not in info.epilog:
            info.epilog = "\n\n".join("\b\n" + p.strip("\n") for p in info.epilog.split("\n\n") if p.strip())
        text = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if text and not info.short_help:
            info.short_help = short_help(text)


def mix_example(a: str, b: str) -> str:
    """The epilog paragraph showing a mix file (eq. 14) for models ``a`` and ``b``, as valid YAML lines."""
    return f"""mix.yaml (the models' eps weighted at each step; the weights sum to 1):
  models: [{a}, {b}]
  gamma: {{type: constant, weights: [0.5, 0.5]}}
or, instead of the constant gamma, weights that change over the steps t (1000 = noise, 0 = image):
  gamma: {{type: ramp, start: {{t: 500, weights: [1, 0]}}, end: {{t: 0, weights: [0, 1]}}}}   (linear between)
  gamma: {{type: piecewise, table: {{300: [1, 0], 0: [0.3, 0.7]}}}}   (at t the largest threshold <= t applies)"""
