"""Fine-tuning recipes as data: named sets of fine-tuning settings that work for a kind of edit.

The table is ``recipes.yaml`` beside this module (its header says how the toy recipes were chosen).
A recipe's ``settings`` are prompt-line keys (``lr``, ``l1``, ``views``, ...) with values; they are
checked by the declared rules when applied (:func:`dclip_ray.config.resolve_finetune_config`, which
is where a recipe sits among a line's, a job's and the presets' values).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from dclip_ray.errors import ConfigError

RECIPES_FILE = Path(__file__).with_name("recipes.yaml")


@dataclass(frozen=True)
class Recipe:
    """One recipe: ``settings`` maps prompt-line keys to values; ``lora``: the keys whose value differs
    when the adapter is LoRA (e.g. a larger lr); ``help`` says what it is for and ``tuned_on`` where its
    values come from."""

    name: str
    help: str
    tuned_on: str
    settings: dict[str, Any]
    lora: dict[str, Any]


@lru_cache(maxsize=1)
def _load() -> dict[str, Recipe]:
    try:
        data = yaml.safe_load(RECIPES_FILE.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:  # a broken installation, not user input
        raise ConfigError(f"cannot read the recipe table {RECIPES_FILE}: {e}; reinstall dclip-ray") from e
    out = {}
    for name, entry in (data.get("recipes") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("settings"), dict):
            raise ConfigError(f"{RECIPES_FILE}: recipe {name!r} needs a 'settings' mapping; fix the table")
        out[str(name)] = Recipe(str(name), str(entry.get("help", "")).strip(), str(entry.get("tuned_on", "")),
                                dict(entry["settings"]), dict(entry.get("lora") or {}))
    return out


def recipe_names() -> tuple[str, ...]:
    """The recipe names, in table order."""
    return tuple(_load())


def list_recipes() -> list[Recipe]:
    """Every recipe, in table order."""
    return list(_load().values())


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; :class:`ConfigError` naming the known ones when there is none."""
    table = _load()
    if name not in table:
        raise ConfigError(f"unknown recipe {name!r}; use one of {', '.join(table)} (`dclip-ray recipes list`)")
    return table[name]


def recipe_values(key: str) -> dict[str, Any]:
    """``{recipe name: value}`` of the prompt-line key ``key`` in every recipe that sets it (the full
    fine-tuning's value; LoRA's differences are in ``Recipe.lora``), in table order."""
    return {r.name: r.settings[key] for r in list_recipes() if key in r.settings}
