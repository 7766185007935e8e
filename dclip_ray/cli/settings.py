"""CLI options built from the settings declared in :mod:`dclip_ray.config` (never declared here).

``@finetune_options`` adds one ``--option`` per :class:`~dclip_ray.config.FinetuneConfig` setting to a
typer command and hands the command the values the user gave as ``settings`` (``{field: value}``,
unset options left out), to be resolved by :func:`dclip_ray.config.resolve_finetune_config`. Every
option defaults to "not given" so that a prompt line or the model preset can still decide; its help
text states the declared default.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, Optional

import typer

from dclip_ray.config import FinetuneConfig, SettingInfo, check_setting, settings_of
from dclip_ray.errors import ConfigError

PREFIX = "setting__"


def _help(s: SettingInfo) -> str:
    default = "none" if s.default in (None, "") else s.default
    # parentheses, not brackets: Rich would read [...] as markup and drop it
    return f"{s.help} (default: {default}; prompt line: {s.prompt}=)" if s.prompt else f"{s.help} (default: {default})"


def _parameter(s: SettingInfo) -> inspect.Parameter:
    if s.type is bool:
        opt = typer.Option(None, f"{s.option}/--no-{s.cli}", help=_help(s), show_default=False)
    else:
        opt = typer.Option(None, s.option, help=_help(s), show_default=False)
    return inspect.Parameter(PREFIX + s.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                             annotation=Optional[s.type])  # noqa: UP045  (typer reads the annotation at run time)


def collect(params: dict[str, Any]) -> dict[str, Any]:
    """The settings among a command's parsed ``params`` (``{field: value}``, unset ones left out), each
    checked by its declared rule (:class:`ConfigError` naming the option)."""
    out = {}
    for s in settings_of(FinetuneConfig):
        value = params.get(PREFIX + s.name)
        if value is None:
            continue
        try:
            out[s.name] = check_setting(s, value)
        except ValueError as e:
            raise ConfigError(f"{s.option} {value!r}: {e}") from None
    return out


def finetune_options(exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command gets every fine-tuning setting but ``exclude`` as an option and receives
    them as the keyword argument ``settings``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "settings"]
        extra = [_parameter(s) for s in settings_of(FinetuneConfig) if s.name not in exclude]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            settings = collect(kwargs)
            for name in [k for k in kwargs if k.startswith(PREFIX)]:
                kwargs.pop(name)
            return fn(**kwargs, settings=settings)

        hints = typing.get_type_hints(fn)
        hints.pop("settings", None)
        command.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        command.__annotations__ = {**hints, **{p.name: p.annotation for p in extra}}
        return command

    return wrap
