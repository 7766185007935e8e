"""The original diffusion model (a "base") and fine-tuned model cards: loading, CLIP choice.

:func:`load_base` loads a UNet (preset name, diffusers folder, checkpoint or URL) with its noise
schedule and the sha256 of its weights; :func:`read_card` reads a fine-tuned folder's ``dclip.json``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dclip_ray.adapters import ADAPTER_FORMAT
from dclip_ray.diffusion import Schedule, schedule_from_config
from dclip_ray.errors import ConfigError, DclipWarning, InputFileError
from dclip_ray.hashing import state_dict_sha256
from dclip_ray.urls import is_remote, local_path, redact

from .clip import load_clip
from .presets import get_preset, list_presets
from .unet import load_schedule_config, load_unet

DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
"""The schedule of a model that states none (DDPM's linear betas, T = 1000)."""


@dataclass
class BaseModel:
    """The original diffusion model, its schedule, resolution and preset (if any)."""

    unet: torch.nn.Module
    schedule: Schedule
    schedule_config: dict[str, Any]
    resolution: int
    preset: Any
    sha256: str


def load_base(model: str, preset: str | None = None, sha256: str | None = None) -> BaseModel:
    """Load the original UNet (preset name, folder, checkpoint or URL) with its schedule. ``sha256``: the
    weights' digest when the caller already has it (a restyle driver passes it to its actors), so the
    weights are not hashed again; None hashes them."""
    unet = load_unet(model, preset)
    sched_cfg = load_schedule_config(model, preset) or dict(DEFAULT_SCHEDULE)
    p = None
    for name in (preset, model):
        if name and name in list_presets():
            p = get_preset(name)
            break
    return BaseModel(unet, schedule_from_config(sched_cfg), dict(sched_cfg), int(unet.config.sample_size), p,
                     sha256 or state_dict_sha256(unet))


def resolve_clip(clip: str | None, clip_weights: str | None, base: BaseModel) -> Any:
    """The CLIP to guide with: ``clip`` (preset or open_clip name) or the model preset's recommendation."""
    name = clip or (base.preset.recommended_clip if base.preset is not None else None)
    if not name:
        raise ConfigError("no CLIP given and the model has no preset: pass --clip NAME --clip-weights PATH")
    return load_clip(name, weights=clip_weights)


def read_card(finetuned: str) -> dict[str, Any]:
    """The ``dclip.json`` of a fine-tuned model folder, local or an fsspec URL (empty dict for a plain
    diffusers folder)."""
    if is_remote(finetuned):
        import fsspec

        url = f"{finetuned.rstrip('/')}/dclip.json"
        try:
            with fsspec.open(url, "rb") as f:
                text = f.read().decode()
        except (FileNotFoundError, OSError):
            return {}
        where = redact(url)
    else:
        path = Path(local_path(finetuned)) / "dclip.json"
        if not path.exists():
            return {}
        text, where = path.read_text(), str(path)
    try:
        card = json.loads(text)
    except ValueError as e:
        raise InputFileError(f"{where}: not valid JSON ({e}); re-save the fine-tuned model") from None
    check_card(card, where)
    return card


CARD_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "source": str, "target": str, "base_model": str, "base_model_sha256": str, "prompt_name": str,
    "quality": dict, "metrics": dict, "format": str}
"""The model-card fields every reader relies on, and their JSON types (others pass as they are)."""


def check_card(card: Any, where: str) -> None:
    """Raise :class:`InputFileError` naming the field when a model card is not a JSON object, a field of
    :data:`CARD_TYPES` has another type, or ``config.t0`` is not a step in 1..999."""
    if not isinstance(card, dict):
        raise InputFileError(f"{where}: expected a JSON object (the model card), got {type(card).__name__}; "
                             "re-save the fine-tuned model")
    for name, kind in CARD_TYPES.items():
        if name in card and card[name] is not None and not isinstance(card[name], kind):
            raise InputFileError(f"{where}: field {name!r} should be {getattr(kind, '__name__', 'another type')}, got "
                                 f"{type(card[name]).__name__}; re-save the fine-tuned model")
    t0 = (card.get("config") or {}).get("t0")
    if t0 is not None and (isinstance(t0, bool) or not isinstance(t0, int) or not 1 <= t0 <= 999):
        shown = repr(t0) if len(repr(t0)) <= 40 else repr(t0)[:37] + "..."
        raise InputFileError(f"{where}: config.t0 should be a step in 1..999, got {shown}; re-save the fine-tuned "
                             "model")


def edit_t0(explicit: int | None, folders: list[str], preset: Any = None, fallback: int = 500) -> int:
    """The return step of an edit with fine-tuned ``folders`` (the one rule of edit, restyle, translate
    and the workflow): ``explicit`` (``--t0``), else the t0 the models' cards agree on, else the base
    preset's, else ``fallback``. Models trained at different t0 need ``explicit`` (:class:`ConfigError`)."""
    t0s = sorted({int(t) for t in ((read_card(f).get("config") or {}).get("t0") for f in folders) if t})
    if explicit is not None:
        return int(explicit)
    if len(t0s) > 1:
        raise ConfigError(f"the fine-tuned models were trained at different t0 {t0s}; pass --t0")
    return t0s[0] if t0s else int(getattr(preset, "t0", None) or fallback)


def check_base_model(base_sha256: str, base_name: str, folders: list[str]) -> None:
    """Warn (one :class:`DclipWarning` line) for each fine-tuned folder whose card names another base
    model's sha256 than ``base_sha256``: its edits would start from latents of a model it never saw. A
    LoRA adapter folder of another base is refused (ConfigError): it means nothing on other weights."""
    for f in folders:
        card = read_card(f)
        other = card.get("base_model_sha256")
        if card.get("format") == ADAPTER_FORMAT and other != base_sha256:
            raise ConfigError(f"{f} is a LoRA adapter of another base model (sha256 {str(other)[:12]}...) than "
                              f"{base_name} ({base_sha256[:12]}...); pass the base it was trained on")
        if other not in (None, base_sha256):
            warnings.warn(f"{f} was fine-tuned from another base model (sha256 {str(other)[:12]}...) than "
                          f"{base_name} ({base_sha256[:12]}...); pass the base it was trained from", DclipWarning,
                          stacklevel=2)
