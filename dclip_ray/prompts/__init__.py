"""Edit prompts: the edit presets (official DiffusionCLIP prompt pairs + toy-world edits) and the
prompt-file parser (``prompts.txt`` -> :class:`EditSpec` list). No torch, no Ray here."""

from __future__ import annotations

from .parse import EditSpec, parse_prompt_file, parse_prompt_text, read_prompt_file, safe_name
from .presets import DOMAINS, EditPreset, get_edit_preset, is_edit_preset, list_edit_presets

__all__ = [
    "DOMAINS",
    "EditPreset",
    "EditSpec",
    "get_edit_preset",
    "is_edit_preset",
    "list_edit_presets",
    "parse_prompt_file",
    "parse_prompt_text",
    "read_prompt_file",
    "safe_name",
]
