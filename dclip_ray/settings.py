"""How a user-facing setting is declared (:func:`setting`), described (:class:`SettingInfo`), listed
(:func:`settings_of`) and checked (:func:`check_setting`): the machinery behind the stage configs of
:mod:`dclip_ray.config`, which every surface (CLI options, prompt lines, workflow specs) is built from."""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from dclip_ray.errors import ConfigError


def setting(default: Any, help: str, *, cli: str, prompt: str | None = None, spec: str | None = "",
            lo: float | None = None, lo_strict: bool = False, hi: float | None = None,
            choices: tuple[str, ...] | None = None, aliases: dict[str, str] | None = None,
            renamed_from: str | None = None, flag: bool = False) -> Any:
    """A dataclass field declared as a user-facing setting.

    ``cli``: the option name without dashes' prefix (``"n-gen"`` for ``--n-gen``); ``prompt``: the
    prompt-line key (None: not settable per prompt); ``spec``: the workflow-spec field ("" = the CLI name
    with ``_`` in the config's ``SPEC_SECTION``; a name without a dot: that key in the section; a dotted
    path: that field; None = not in the spec); ``lo``/``hi``/``choices``: the value rule;
    ``aliases``: other spellings of a choice (``{"none": ""}``), accepted on every surface;
    ``renamed_from``: the setting's old prompt-line key, still accepted with a one-line warning;
    ``flag``: a bool given on the CLI as ``--name`` alone (no ``--no-name``).
    """
    meta = {"help": help, "cli": cli, "prompt": prompt, "spec": cli.replace("-", "_") if spec == "" else spec,
            "lo": lo, "lo_strict": lo_strict, "hi": hi, "choices": choices,
            "aliases": dict(aliases or {}), "renamed_from": renamed_from, "flag": flag}
    return field(default=default, metadata={"setting": meta})


@dataclass(frozen=True)
class SettingInfo:
    """One declared setting of a config class (see :func:`setting`)."""

    name: str
    type: type
    optional: bool
    default: Any
    help: str
    cli: str
    prompt: str | None
    spec: str | None
    lo: float | None
    lo_strict: bool
    hi: float | None
    choices: tuple[str, ...] | None
    aliases: dict[str, str]
    renamed_from: str | None = None
    flag: bool = False

    @property
    def spec_key(self) -> str | None:
        """The field name inside its spec section (``lr`` for ``finetune.lr``)."""
        return None if self.spec is None else self.spec.rsplit(".", 1)[-1]

    @property
    def spec_section(self) -> str | None:
        """The spec section holding the field (``finetune`` for ``finetune.lr``; "" for a top-level field)."""
        if self.spec is None:
            return None
        return self.spec.rsplit(".", 1)[0] if "." in self.spec else ""

    @property
    def option(self) -> str:
        """The CLI option, e.g. ``--n-gen``."""
        return f"--{self.cli}"

    def rule(self) -> str:
        """The value rule in words, e.g. ``an integer 1..999``, ``a number > 0``, ``one of efficient, full``."""
        if self.choices is not None:
            return "one of " + ", ".join([*self.aliases, *(c for c in self.choices if c)])
        if self.type is bool:
            return "true or false"
        kind = "an integer" if self.type is int else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} {self.lo:g}..{self.hi:g}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_strict else '>='} {self.lo:g}"
        return kind


def _base_type(tp: Any) -> tuple[type, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return str, False
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return _base_type(inner)[0], True
    return tp, False


def settings_of(cls: type) -> list[SettingInfo]:
    """The declared settings of a config dataclass, in declaration order (spec paths made absolute with
    the class's ``SPEC_SECTION``; "" = the spec's top level)."""
    hints = typing.get_type_hints(cls)
    section = getattr(cls, "SPEC_SECTION", "")
    out = []
    for f in fields(cls):
        meta = f.metadata.get("setting")
        if meta is None:
            continue
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else None
        spec = meta["spec"]
        if spec is not None and "." not in spec and section:
            spec = f"{section}.{spec}"
        out.append(SettingInfo(f.name, tp, optional, default, **{**meta, "spec": spec}))
    return out


def validate_settings(obj: Any) -> None:
    """Check and convert every declared setting of a frozen config in place (:class:`ConfigError`)."""
    for s in settings_of(type(obj)):
        try:
            value = check_setting(s, getattr(obj, s.name))
        except ValueError as e:
            raise ConfigError(f"{s.name}={getattr(obj, s.name)!r}: {e}") from None
        object.__setattr__(obj, s.name, value)


def check_setting(s: SettingInfo, value: Any) -> Any:
    """``value`` converted to the setting's type and checked against its rule; raises ``ValueError``
    with ``"expected <rule>"`` (each surface adds where the value came from). None passes for an
    optional setting."""
    if value is None and s.optional:
        return None
    try:
        if s.type is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                v: Any = value.lower() in ("true", "1", "yes")
            else:
                v = bool(value)
        elif s.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            v = int(value, 10) if isinstance(value, str) else int(value)
        elif s.type is float:
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
        else:
            v = str(value)
            v = s.aliases.get(v, v)
    except (TypeError, ValueError):
        raise ValueError(f"expected {s.rule()}") from None
    if s.choices is not None and v not in s.choices:
        raise ValueError(f"expected {s.rule()}")
    if s.type in (int, float) and s.lo is not None and (v < s.lo or (s.lo_strict and v == s.lo)):
        raise ValueError(f"expected {s.rule()}")
    if s.type in (int, float) and s.hi is not None and v > s.hi:
        raise ValueError(f"expected {s.rule()}")
    return v


SHARED: dict[str, dict[str, Any]] = {
    "t0": {"default": 500, "help": "Return step t0.", "cli": "t0", "lo": 1, "hi": 999},
    "n_inv_steps": {"default": 40, "help": "Inversion steps S_inv.", "cli": "n-inv", "lo": 2},
    "n_gen_steps": {"default": 40, "help": "Generation steps S_gen.", "cli": "n-gen", "lo": 2},
    "resize_policy": {"default": "center-crop", "help": "How an image of another size becomes the model's: "
                      "center-crop, resize or pad.", "cli": "resize-policy", "spec": "input.resize_policy",
                      "choices": ("center-crop", "resize", "pad")},
    "batch_size": {"default": 16, "help": "Images per batch.", "cli": "batch-size", "lo": 1},
}
"""Settings that several stages share, declared once: ``{config field: setting() arguments}``; a stage
may give its own default and help text (:func:`shared`), never its own rule or name."""


def shared(name: str, **own: Any) -> Any:
    """The shared setting ``name`` (:data:`SHARED`) as a field of a stage's config; ``own`` may set
    ``default``, ``help``, ``prompt`` and ``spec``."""
    if set(own) - {"default", "help", "prompt", "spec"}:
        raise TypeError(f"shared setting {name}: only default, help, prompt and spec may differ")
    args = {**SHARED[name], **own}
    return setting(args.pop("default"), args.pop("help"), **args)
