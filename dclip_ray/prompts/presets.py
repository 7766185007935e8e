"""Edit presets as data: named CLIP prompt pairs with their recommended t0 and loss weights.

The table lives in ``presets.yaml`` next to this module (its header says where each entry comes
from). It holds the official DiffusionCLIP prompt pairs (face, dog, church, bedroom, ImageNet
styles; the official "grey hair" -> "red hair" slip fixed) and this project's toy-world edits.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dclip_ray.errors import ConfigError
from dclip_ray.recipes import recipe_names

PRESETS_FILE = Path(__file__).with_name("presets.yaml")

Domain = Literal["face", "dog", "church", "bedroom", "imagenet", "toy"]
DOMAINS: tuple[str, ...] = ("face", "dog", "church", "bedroom", "imagenet", "toy")
"""The domains an edit preset can belong to (one base model each)."""


class EditPreset(BaseModel):
    """One edit preset: fine-tune toward ``target`` away from ``source``.

    ``t0`` is the recommended return step (integer timestep in [1, 999]); ``recipe`` names the
    fine-tuning recipe it trains with (:mod:`dclip_ray.recipes`; its loss weights, learning rate, ...);
    ``official_id`` is the official code's ID-loss weight (ArcFace; informational, None when the
    edit has no face). ``model`` is the base-model preset the edit was made for.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    domain: Domain
    source: str = Field(min_length=1)
    target: str = Field(min_length=1)
    t0: int = Field(ge=1, le=999)
    t0_from: Literal["checkpoint", "readme", "ours"]
    recipe: str
    official_id: float | None = None
    origin: Literal["official", "checkpoint", "ours"]
    model: str
    notes: str = ""


@lru_cache(maxsize=1)
def _load() -> dict[str, EditPreset]:
    try:
        data = yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:  # a broken installation, not user input
        raise ConfigError(f"cannot read the edit preset table {PRESETS_FILE}: {e}; reinstall dclip-ray") from e
    defaults = dict(data.get("defaults", {}))
    domains = dict(data.get("domains", {}))
    out: dict[str, EditPreset] = {}
    for i, entry in enumerate(data.get("presets", [])):
        raw = {**defaults, **entry}
        raw.setdefault("model", domains.get(raw.get("domain"), ""))
        try:
            preset = EditPreset(**raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(
                f"{PRESETS_FILE}: preset #{i + 1} ({entry.get('name')!r}) field {where}: {first['msg']}; fix the table"
            ) from e
        if preset.recipe not in recipe_names():
            raise ConfigError(f"{PRESETS_FILE}: preset {preset.name!r} names recipe {preset.recipe!r}, which "
                              f"recipes.yaml lacks ({', '.join(recipe_names())}); fix the table")
        if preset.name in out:
            raise ConfigError(f"{PRESETS_FILE}: preset name {preset.name!r} appears twice; rename one")
        out[preset.name] = preset
    return out


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def list_edit_presets(domain: str | None = None) -> list[EditPreset]:
    """All edit presets in table order, or only those of ``domain`` (one of :data:`DOMAINS`)."""
    presets = list(_load().values())
    if domain is None:
        return presets
    d = domain.strip().lower()
    if d not in DOMAINS:
        raise ConfigError(f"unknown edit-preset domain {domain!r}; use one of {', '.join(DOMAINS)}")
    return [p for p in presets if p.domain == d]


def is_edit_preset(name: str) -> bool:
    """Whether ``name`` names an edit preset (case-insensitive; ``-`` and ``_`` are the same)."""
    return _normalise(name) in _load()


def suggest_edit_presets(name: str, n: int = 3) -> list[str]:
    """Up to ``n`` preset names close to ``name`` (for "did you mean" hints)."""
    return difflib.get_close_matches(_normalise(name), list(_load()), n=n, cutoff=0.6)


def get_edit_preset(name: str) -> EditPreset:
    """The edit preset called ``name`` (case-insensitive; ``-`` and ``_`` are the same).

    Raises :class:`ConfigError` naming the closest preset names when there is none.
    """
    table = _load()
    key = _normalise(name)
    if key in table:
        return table[key]
    close = suggest_edit_presets(name)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"unknown edit preset {name!r}; {hint}see `dclip-ray presets list`")
