"""The prompt-file parser: ``prompts.txt`` -> a list of :class:`EditSpec`.

Format (one edit per line; ``#`` starts a comment anywhere on a line; blank lines are ignored)::

    # SOURCE -> TARGET  [key=value ...]
    face -> angry face  t0=500 l1=1.0 id=0.0 name=angry
    photo -> sketch
    pixar                  # a bare preset name: its pair, t0 and recipe
    neanderthal t0=500     # a preset with overrides

Options (all optional, at the end of the line): ``name`` (lowercase letters, digits, ``_``, ``-``;
derived from the target when absent), ``images`` (this line's own training images, a folder, tar, brace
list or glob, local or URL: finetune-many then takes its first ``n_train`` instead of choosing by
source) and every per-prompt fine-tuning setting, by its prompt-line key
(:data:`PROMPT_SETTINGS`, declared with its rule and default in :class:`dclip_ray.config.FinetuneConfig`):
``t0``, ``n_inv``, ``n_gen``, ``mode``, ``epochs``, ``batch``, ``lr``, ``lr_gamma``, the loss weights
``clip_weight`` (formerly ``clip``), ``l1``, ``id``, ``global``, ``edge`` with ``edge_scales``, ``frame``, ``layout``,
``palette``, the refinement stage ``refine``, ``refine_l1``, ``refine_scales``, ``refine_layout``,
``clip_form``, the CLIP-view augmentation ``views``, ``shift``, ``noise``, ``blur``, ``flip`` (none, h, hv) and ``seed``. A shape edit on the toy world, for example:
``red circle -> red square t0=550 mode=full n_gen=10 lr=1e-4 clip_weight=5 l1=2 noise=0.1 flip=hv``. An
option left out is None: the consumer fills it from the job, the model preset or the declared default
(:func:`dclip_ray.config.resolve_finetune_config`). ``→`` is accepted for ``->``.

Every error is a :class:`~dclip_ray.errors.ConfigError` with the message
``ORIGIN:LINE:COL: what is wrong; how to fix`` (1-based line and column).
"""

from __future__ import annotations

import os
import re
import unicodedata
import warnings
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from dclip_ray.config import FinetuneConfig, check_setting, settings_of
from dclip_ray.errors import ConfigError, DclipWarning, InputFileError

from .presets import get_edit_preset, is_edit_preset, suggest_edit_presets

ARROWS: tuple[str, ...] = ("->", "\u2192")
MAX_PROMPT_FILE_BYTES = 1 << 20
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_OPTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*=")
_TOKEN_RE = re.compile(r"\S+")


PROMPT_SETTINGS = {s.prompt: s for s in settings_of(FinetuneConfig) if s.prompt}
"""The per-prompt fine-tuning settings by prompt-line key (declared once, in :mod:`dclip_ray.config`)."""

RENAMED_KEYS = {s.renamed_from: key for key, s in PROMPT_SETTINGS.items() if s.renamed_from}
"""Old prompt-line keys still accepted, with a one-line warning: ``{"clip": "clip_weight"}``."""


class _EditSpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    source: str
    target: str
    preset: str | None = None
    line: int | None = None
    images: str | None = None  # this line's own training images (URL or glob): no selection by source

    def settings(self) -> dict[str, Any]:
        """The fine-tuning settings this line sets, as ``{FinetuneConfig field: value}``."""
        return {s.name: getattr(self, key) for key, s in PROMPT_SETTINGS.items() if getattr(self, key) is not None}

    def resolve(self, **defaults: Any) -> EditSpec:
        """A copy with every None field among ``defaults``' keys set to the default given.

        E.g. ``spec.resolve(t0=model.t0, clip_weight=3.0, l1=0.0, id=0.0)``; set fields are kept.
        """
        unknown = set(defaults) - set(type(self).model_fields)
        if unknown:
            raise ConfigError(f"EditSpec.resolve: unknown field(s) {', '.join(sorted(unknown))}; use {', '.join(type(self).model_fields)}")
        update = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return self.model_copy(update=update)


EditSpec = create_model(  # one optional field per prompt-line key, typed as declared
    "EditSpec", __base__=_EditSpecBase, __module__=__name__,
    **{key: (s.type | None, None) for key, s in PROMPT_SETTINGS.items()},
)
EditSpec.__doc__ = """One edit of a prompt file: fine-tune toward ``target`` away from ``source``.

Besides ``name``, ``source``, ``target``, ``preset`` (the edit preset a bare preset line expanded) and
``line`` (1-based, None when built in code), it has one optional field per prompt-line key of
:data:`PROMPT_SETTINGS` (``t0``, ``clip_weight``, ``l1``, ``views``, ...), None when the line did not set it
(the consumer takes the job's, the model preset's or the declared default, see
:func:`dclip_ray.config.resolve_finetune_config`)."""


# ---- option values ------------------------------------------------------------------------------


def _name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError("expected 1-64 characters of lowercase letters, digits, '_' or '-', starting with a letter or digit")
    return v


def _images(v: str) -> str:
    if not v.strip():
        raise ValueError("expected a folder, .tar, brace list or glob of images (local or URL)")
    return v


def _setting_parser(key: str) -> Callable[[str], Any]:
    s = PROMPT_SETTINGS[key]
    return lambda v: check_setting(s, v)


OPTIONS: dict[str, Callable[[str], Any]] = {"name": _name, "images": _images,
                                           **{k: _setting_parser(k) for k in PROMPT_SETTINGS}}
"""The ``key=value`` options of a prompt line and their value parsers."""


def safe_name(text: str, fallback: str = "edit") -> str:
    """A file-system-safe edit name from free text: lowercase ASCII, ``[a-z0-9_-]``, at most 64 chars.

    ``"3D render in the style of Pixar"`` -> ``"3d_render_in_the_style_of_pixar"``; ``fallback``
    when nothing is left.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9_-]+", "_", ascii_text).strip("_-")[:64].strip("_-")
    return slug or fallback


# ---- the parser ---------------------------------------------------------------------------------


class _Line:
    """One line being parsed: raises errors with the origin, line and column."""

    def __init__(self, origin: str, lineno: int, text: str) -> None:
        self.origin, self.lineno, self.text = origin, lineno, text

    def error(self, col: int, what: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.origin}:{self.lineno}:{col}: {what}; {fix}")


def _tokens(text: str, offset: int = 0) -> list[tuple[str, int]]:
    """Whitespace-separated tokens of ``text`` with their 1-based columns (``offset`` chars before)."""
    return [(m.group(), offset + m.start() + 1) for m in _TOKEN_RE.finditer(text)]


def _find_arrows(text: str) -> list[tuple[int, str]]:
    found = []
    i = 0
    while i < len(text):
        for a in ARROWS:
            if text.startswith(a, i):
                found.append((i, a))
                i += len(a) - 1
                break
        i += 1
    return found


def _parse_options(ln: _Line, tokens: list[tuple[str, int]]) -> tuple[dict[str, Any], dict[str, int]]:
    """``key=value`` tokens -> (values, column of each key)."""
    values: dict[str, Any] = {}
    cols: dict[str, int] = {}
    allowed = ", ".join(OPTIONS)
    for tok, col in tokens:
        if "=" not in tok:
            raise ln.error(col, f"expected key=value, got {tok!r}", "options go at the end of the line, after the target text")
        key, value = tok.split("=", 1)
        key_l = key.lower()
        if key_l in RENAMED_KEYS:
            new = RENAMED_KEYS[key_l]
            warnings.warn(f"{ln.origin}:{ln.lineno}: the prompt option '{key_l}=' is renamed '{new}=' "
                          f"(as --{PROMPT_SETTINGS[new].cli}); write {new}={value}", DclipWarning, stacklevel=2)
            key_l = new  # the column of the value is still counted from the key as written
        if key_l not in OPTIONS:
            raise ln.error(col, f"unknown option {key!r}", f"use one of {allowed}")
        if key_l in values:
            raise ln.error(col, f"option {key_l!r} given twice (first at column {cols[key_l]})", "keep one")
        vcol = col + len(key) + 1
        if value == "":
            raise ln.error(vcol, f"option {key_l!r} has no value", f"write {key_l}=VALUE without spaces around '='")
        try:
            values[key_l] = OPTIONS[key_l](value)
        except ValueError as e:
            raise ln.error(vcol, f"bad value {value!r} for {key_l}", str(e)) from None
        cols[key_l] = col
    return values, cols


def _split_options(tokens: list[tuple[str, int]]) -> int:
    """Index of the first ``key=value`` token (len(tokens) when there is none)."""
    for k, (tok, _) in enumerate(tokens):
        if _OPTION_RE.match(tok):
            return k
    return len(tokens)


def _parse_line(ln: _Line) -> tuple[EditSpec, int] | None:
    """One line -> (spec, column to blame for a duplicate name), or None for blank/comment lines."""
    content = ln.text.split("#", 1)[0]
    if not content.strip():
        return None
    arrows = _find_arrows(content)
    if len(arrows) > 1:
        raise ln.error(arrows[1][0] + 1, f"more than one {arrows[1][1]!r} on the line", "write one edit per line: SOURCE -> TARGET")

    if arrows:
        a, arrow = arrows[0]
        src_tokens = _tokens(content[:a])
        if not src_tokens:
            raise ln.error(a + 1, f"missing source text before {arrow!r}", "write SOURCE -> TARGET, e.g. 'face -> angry face'")
        k = _split_options(src_tokens)
        if k < len(src_tokens):
            raise ln.error(src_tokens[k][1], f"option {src_tokens[k][0]!r} before {arrow!r}", "options go at the end of the line, after the target text")
        rest = _tokens(content[a + len(arrow):], offset=a + len(arrow))
        k = _split_options(rest)
        target_tokens, option_tokens = rest[:k], rest[k:]
        if not target_tokens:
            col = option_tokens[0][1] if option_tokens else a + len(arrow) + 1
            raise ln.error(col, f"missing target text after {arrow!r}", "write SOURCE -> TARGET, e.g. 'face -> angry face'")
        source = " ".join(t for t, _ in src_tokens)
        target = " ".join(t for t, _ in target_tokens)
        if source.casefold() == target.casefold():
            raise ln.error(target_tokens[0][1], f"target {target!r} is the same as the source", "give a different target text")
        values, cols = _parse_options(ln, option_tokens)
        name = values.pop("name", None) or safe_name(target, fallback=f"edit_{ln.lineno}")
        spec = EditSpec(name=name, source=source, target=target, line=ln.lineno, **values)
        return spec, cols.get("name", 1)

    tokens = _tokens(content)
    head, head_col = tokens[0]
    if _OPTION_RE.match(head):
        raise ln.error(head_col, f"option {head!r} without an edit", "start the line with SOURCE -> TARGET or a preset name")
    if len(tokens) > 1 and not _OPTION_RE.match(tokens[1][0]):
        raise ln.error(
            tokens[1][1], "missing '->'",
            "write SOURCE -> TARGET (e.g. 'face -> angry face'), or a single preset name from `dclip-ray presets list`",
        )
    if not is_edit_preset(head):
        close = suggest_edit_presets(head)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ln.error(
            head_col, f"unknown edit preset {head!r}",
            f"{hint}pick one from `dclip-ray presets list`, or write SOURCE -> TARGET",
        )
    p = get_edit_preset(head)
    values, cols = _parse_options(ln, tokens[1:])
    name = values.pop("name", None) or p.name
    spec = EditSpec(name=name, source=p.source, target=p.target, preset=p.name, line=ln.lineno, **values)
    return spec, cols.get("name", 1)


def parse_prompt_text(text: str, origin: str = "prompts.txt") -> list[EditSpec]:
    """Parse prompt-file ``text`` (the format in the module docstring) into edits, in file order.

    ``origin`` names the input in error messages (``ORIGIN:LINE:COL: ...``). Raises
    :class:`ConfigError` on the first malformed line, on duplicate edit names (naming both lines)
    and when the text holds no edit at all.
    """
    specs: list[EditSpec] = []
    seen: dict[str, int] = {}
    text = text.removeprefix("\ufeff")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        ln = _Line(origin, lineno, raw)
        parsed = _parse_line(ln)
        if parsed is None:
            continue
        spec, name_col = parsed
        if spec.name in seen:
            raise ln.error(
                name_col, f"duplicate edit name {spec.name!r} (line {seen[spec.name]} has it too)",
                "give one of them another name=NAME",
            )
        seen[spec.name] = lineno
        specs.append(spec)
    if not specs:
        raise ConfigError(f"{origin}:1:1: no edits in the prompt file; add lines like 'face -> angry face' or a preset name such as 'pixar'")
    return specs


def read_prompt_file(path_or_url: str | os.PathLike[str]) -> str:
    """The UTF-8 text of a prompt file at a local path or fsspec URL (at most 1 MiB).

    Raises :class:`InputFileError` when it is missing, unreadable, too large or not UTF-8.
    """
    import fsspec

    src = os.fspath(path_or_url)
    try:
        with fsspec.open(src, "rb") as f:
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputFileError(f"prompt file {src} not found; check the path or URL") from None
    except IsADirectoryError:
        raise InputFileError(f"prompt file {src} is a folder; give the prompts.txt file inside it") from None
    except (OSError, ValueError, ImportError) as e:
        raise InputFileError(f"cannot read prompt file {src}: {e}; check the path or URL and its credentials") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise InputFileError(f"prompt file {src} is larger than 1 MiB; give a text file with one edit per line")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"prompt file {src} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None


def parse_prompt_file(path_or_url: str | os.PathLike[str]) -> list[EditSpec]:
    """Parse a prompt file at a local path or fsspec URL (e.g. ``s3://bucket/prompts.txt``).

    A ``str`` holding a newline is taken as the prompt text itself (origin ``prompts.txt``).
    Errors name the file, line and column; see :func:`parse_prompt_text`.
    """
    if isinstance(path_or_url, str) and "\n" in path_or_url:
        return parse_prompt_text(path_or_url)
    text = read_prompt_file(path_or_url)
    return parse_prompt_text(text, origin=os.fspath(path_or_url))
