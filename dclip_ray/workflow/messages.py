"""A pydantic validation error of a workflow spec as ONE line naming the field by its dotted path and
the fix (``finetune.epochs: must be >= 1 (got 0)``; an unknown field names the allowed ones)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel

from dclip_ray.errors import ConfigError


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _allowed_fields(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
    return [n for n in (model.model_fields if model else {}) if n != "source"]


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def message(err: dict[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    """(dotted field, 'what is wrong and the fix') of one pydantic error."""
    loc = tuple(err.get("loc", ()))
    typ, ctx, got = err.get("type", ""), err.get("ctx") or {}, err.get("input")
    where = _dotted(loc)
    if typ == "extra_forbidden":
        allowed = _allowed_fields(loc, root)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return where, f"unknown field; {hint}allowed here: {', '.join(allowed)}"
    if typ == "missing":
        return where, "required field is missing; add it"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if typ in bounds:
        bound = next(iter(ctx.values())) if ctx else "?"
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        return where, f"must be {bounds[typ]} {bound} (got {_short(got)})"
    if typ == "literal_error":
        return where, f"must be one of {ctx.get('expected', '?')} (got {_short(got)})"
    if typ in ("int_parsing", "int_type", "int_from_float"):
        return where, f"must be an integer (got {_short(got)})"
    if typ in ("float_parsing", "float_type"):
        return where, f"must be a number (got {_short(got)})"
    if typ in ("bool_parsing", "bool_type"):
        return where, f"must be true or false (got {_short(got)})"
    if typ in ("string_type",):
        return where, f"must be a string (got {_short(got)})"
    if typ in ("list_type",):
        return where, f"must be a list (got {_short(got)})"
    if typ in ("model_type", "model_attributes_type", "dict_type"):
        return where, f"must be a mapping of fields (got {_short(got)})"
    if typ == "too_short":
        return where, f"must not be empty (got {_short(got)})"
    if typ == "string_pattern_mismatch":
        return where, f"must be letters, digits, '_', '.' or '-' (got {_short(got)})"
    if typ == "value_error":
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return where, msg
    return where, f"{err.get('msg', 'invalid value')} (got {_short(got)})"


def fail(origin: str, where: str, msg: str) -> ConfigError:
    return ConfigError(f"workflow spec {origin}: {where}: {msg}")
