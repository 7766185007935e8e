"""The original diffusion model (a "base") and fine-tuned model cards: loading, CLIP choice.

:func:`load_base` loads a UNet (preset name, diffusers folder, checkpoint or URL) with its noise
schedule and the sha256 of its weights; the cards of fine-tuned folders are :mod:`.card`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dclip_ray.diffusion import Schedule, schedule_from_config
from dclip_ray.errors import ConfigError, DclipWarning
from dclip_ray.hashing import state_dict_sha256

from .card import ModelCard
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


def edit_t0(explicit: int | None, cards: Sequence[ModelCard], preset: Any = None, fallback: int = 500) -> int:
    """The return step of an edit with the fine-tuned models of ``cards`` (the one rule of edit, restyle,
    translate and the workflow): ``explicit`` (``--t0``), else the t0 the models' cards agree on, else the base
    preset's, else ``fallback``. Models trained at different t0 need ``explicit`` (:class:`ConfigError`)."""
    t0s = sorted({c.t0 for c in cards if c.t0})
    if explicit is not None:
        return int(explicit)
    if len(t0s) > 1:
        raise ConfigError(f"the fine-tuned models were trained at different t0 {t0s}; pass --t0")
    return t0s[0] if t0s else int(getattr(preset, "t0", None) or fallback)


def check_base_model(base_sha256: str, base_name: str, cards: Mapping[str, ModelCard]) -> None:
    """Warn (one :class:`DclipWarning` line) for each fine-tuned folder (``cards``: folder -> its card) whose
    card names another base model's sha256 than ``base_sha256``: its edits would start from latents of a model
    it never saw. A LoRA adapter folder of another base is refused (ConfigError): it means nothing on other
    weights."""
    for f, card in cards.items():
        other = card.base_model_sha256
        if card.is_adapter and other != base_sha256:
            raise ConfigError(f"{f} is a LoRA adapter of another base model (sha256 {str(other)[:12]}...) than "
                              f"{base_name} ({base_sha256[:12]}...); pass the base it was trained on")
        if other not in (None, base_sha256):
            warnings.warn(f"{f} was fine-tuned from another base model (sha256 {str(other)[:12]}...) than "
                          f"{base_name} ({base_sha256[:12]}...); pass the base it was trained from", DclipWarning,
                          stacklevel=2)
