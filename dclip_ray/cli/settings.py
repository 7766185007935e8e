"""CLI options built from the settings declared in :mod:`dclip_ray.config` (never declared here).

``@config_options(Cls, "name")`` adds one ``--option`` per setting of the config class ``Cls`` (all of
them, or ``only`` those, less ``exclude``) to a typer command and hands the command the values the user
gave as the keyword argument ``name`` (``{field: value}``, unset options left out), each checked by its
declared rule. Every option defaults to "not given", so that a prompt line or the model preset can
still decide, and ``Cls(**given)`` fills in the declared defaults; the help text states them.
``@finetune_options()`` is the fine-tuning settings as ``settings``.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, replace
from typing import Any, Optional

import typer

from dclip_ray.config import FinetuneConfig, RunOptions, SettingInfo, check_setting, settings_of
from dclip_ray.errors import ConfigError
from dclip_ray.recipes import recipe_values

PREFIX = "setting__"
NO_OPTIONS = RunOptions()
"""The default of a command's ``opts`` parameter in its signature (typer never passes it: the decorator does)."""


def _help(s: SettingInfo) -> str:
    if s.flag or (s.prompt is None and "default:" in s.help):  # off unless given, or the help says it
        return s.help
    default = "none" if s.default in (None, "") else s.default
    by_recipe = recipe_values(s.prompt) if s.prompt else {}
    if by_recipe:  # the value a run gets is its recipe's: say so, not only the bare default
        default = ("the recipe's (" + ", ".join(f"{k} {v}" for k, v in by_recipe.items()) + f"), else {default}")
    # parentheses, not brackets: Rich would read [...] as markup and drop it
    return f"{s.help} (default: {default}; prompt line: {s.prompt}=)" if s.prompt else f"{s.help} (default: {default})"


def _parameter(s: SettingInfo, prefix: str, help: str | None = None, default: Any = MISSING) -> inspect.Parameter:
    s = replace(s, **({} if help is None else {"help": help}), **({} if default is MISSING else {"default": default}))
    text = _help(s)
    if s.flag:
        opt = typer.Option(None, s.option, help=text, show_default=False)
    elif s.type is bool:
        opt = typer.Option(None, f"{s.option}/--no-{s.cli}", help=text, show_default=False)
    else:
        opt = typer.Option(None, s.option, help=text, show_default=False)
    return inspect.Parameter(prefix + s.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                             annotation=Optional[s.type])  # noqa: UP045  (typer reads the annotation at run time)


def _chosen(cls: type, only: Iterable[str] | None, exclude: Iterable[str]) -> list[SettingInfo]:
    wanted = None if only is None else set(only)
    return [s for s in settings_of(cls) if (wanted is None or s.name in wanted) and s.name not in set(exclude)]


def collect(params: dict[str, Any], cls: type = FinetuneConfig, name: str = "settings") -> dict[str, Any]:
    """The settings of ``cls`` among a command's parsed ``params`` (``{field: value}``, unset ones left
    out), each checked by its declared rule (:class:`ConfigError` naming the option)."""
    out = {}
    for s in settings_of(cls):
        value = params.get(f"{PREFIX}{name}__{s.name}")
        if value is None:
            continue
        try:
            out[s.name] = check_setting(s, value)
        except ValueError as e:
            raise ConfigError(f"{s.option} {value!r}: {e}") from None
    return out


def config_options(cls: type, name: str, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                   helps: dict[str, str] | None = None, defaults: dict[str, Any] | None = None,
                   build: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command gets the chosen settings of ``cls`` as options and receives the given ones
    as the keyword argument ``name``: a ``{field: value}`` dict, or with ``build`` the config
    ``cls(**defaults, **given)`` itself. ``helps`` words a setting's help for this command and ``defaults``
    gives it this command's default (``{field: value}``, shown in the help; only with ``build``); its
    name, type and rule stay the declaration's. Decorators stack."""
    prefix = f"{PREFIX}{name}__"
    chosen = _chosen(cls, only, exclude)
    own_helps, own_defaults = dict(helps or {}), dict(defaults or {})
    unknown = (set(own_helps) | set(own_defaults)) - {s.name for s in chosen}
    if unknown or (own_defaults and not build):
        raise TypeError(f"helps/defaults for settings not chosen, or defaults without build: {sorted(unknown)}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != name]
        extra = [_parameter(s, prefix, own_helps.get(s.name), own_defaults.get(s.name, MISSING)) for s in chosen]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = collect(kwargs, cls, name)
            for k in [k for k in kwargs if k.startswith(prefix)]:
                kwargs.pop(k)
            return fn(**kwargs, **{name: cls(**{**own_defaults, **given}) if build else given})

        hints = typing.get_type_hints(fn, include_extras=True)  # keep Annotated[..., typer.Option(...)]
        hints.pop(name, None)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]  # evaluated, not strings
        command.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        command.__annotations__ = {**hints, **{p.name: p.annotation for p in extra}}
        return command

    return wrap


def run_options(*names: str, helps: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the job options ``names`` of :class:`dclip_ray.config.RunOptions` (declared there once),
    received as ``opts`` (a ``RunOptions``)."""
    return config_options(RunOptions, "opts", only=names, helps=helps, build=True)


def finetune_options(exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: every fine-tuning setting but ``exclude`` as an option, received as ``settings``."""
    return config_options(FinetuneConfig, "settings", exclude=exclude)
