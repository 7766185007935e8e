"""Model presets as data: one YAML file per preset under ``dclip_ray/models/presets/``.

A preset names an architecture (a UNet in one of the checkpoint formats, or an open_clip CLIP),
its noise schedule, resolution, default return step t0, loss weights and fine-tuning recipe (for an
edit that names none), the bar a fine-tuned model's held-aside edits must score to pass
(``quality_bar``, :mod:`dclip_ray.quality`; measured for the toy model, none for the real ones), the
recommended CLIP, whether the face-identity loss applies, and where a user gets the checkpoint. ``weights`` may be
a packaged resource, written ``package:<path relative to the dclip_ray package>``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dclip_ray.errors import ConfigError, InputFileError

from .convert import adm_unet_config, ddpm_unet_config, scheduler_config

PRESET_DIR = Path(__file__).with_name("presets")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGE_PREFIX = "package:"


def resolve_package_path(path: str) -> str:
    """``package:rel/path`` -> absolute path inside the installed dclip_ray package; else unchanged."""
    if path.startswith(PACKAGE_PREFIX):
        return str(PACKAGE_DIR / path[len(PACKAGE_PREFIX):])
    return path


class ScheduleSpec(BaseModel):
    """Linear beta schedule of the pretrained model (all presets: 1e-4 .. 2e-2 over T = 1000)."""

    model_config = ConfigDict(extra="forbid")
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    beta_schedule: str = "linear"
    variance_type: str = "fixed_small"

    def to_scheduler_config(self) -> dict:
        """The diffusers ``scheduler_config.json`` dict."""
        return scheduler_config(self.T, self.beta_start, self.beta_end, self.beta_schedule, self.variance_type)


class LossWeights(BaseModel):
    """Default fine-tuning loss weights: directional CLIP, L1 to the input, face identity."""

    model_config = ConfigDict(extra="forbid")
    clip: float = 3.0
    l1: float = 0.0
    id: float = 0.0


class Source(BaseModel):
    """Where a user gets the checkpoint: human text and a URL (None for bundled weights)."""

    text: str
    url: str | None = None


class Preset(BaseModel):
    """One model preset (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Literal["unet", "clip"]
    description: str = ""
    format: Literal["diffusers", "ddim", "adm"] | None = None
    architecture: dict = Field(default_factory=dict)
    schedule: ScheduleSpec | None = None
    resolution: int | None = None
    t0: int | None = None
    loss_weights: LossWeights | None = None
    recipe: str | None = None
    recipe_when_changed: dict[str, str] = Field(default_factory=dict)
    quality_bar: float | None = None
    recommended_clip: str | None = None
    face_loss: bool = False
    face_crop: str | None = None
    source: Source
    weights: str | None = None

    def unet_config(self) -> dict | None:
        """The diffusers ``UNet2DModel`` config of a raw-checkpoint UNet preset (None for
        'diffusers' presets, whose folder carries its own config)."""
        a = dict(self.architecture)
        if self.kind != "unet" or self.format == "diffusers":
            return None
        if self.format == "ddim":
            return ddpm_unet_config(resolution=self.resolution or 256, **a)
        return adm_unet_config(resolution=self.resolution or 256, **a)

    def weights_path(self) -> str | None:
        """The preset's own weights as a usable path (packaged resources resolved), or None."""
        return resolve_package_path(self.weights) if self.weights else None

    @property
    def url(self) -> str | None:
        """Where to get the checkpoint (None for bundled weights)."""
        return self.source.url


def _parse(path: Path) -> Preset:
    try:
        data = yaml.safe_load(path.read_text())
        return Preset.model_validate(data)
    except (OSError, yaml.YAMLError) as e:
        raise InputFileError(f"cannot read preset file {path}: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"preset file {path}: {where}: {first['msg']}") from None


@cache
def _registry() -> dict[str, Preset]:
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        p = _parse(path)
        presets[p.name] = p
    return presets


def list_presets(kind: str | None = None) -> list[str]:
    """Names of the registered presets (optionally only ``kind`` 'unet' or 'clip'), sorted."""
    return sorted(n for n, p in _registry().items() if kind is None or p.kind == kind)


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or a preset YAML file at path ``name`` (``*.yaml``/``*.yml``).

    Raises ConfigError for an unknown name (listing the known ones).
    """
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise InputFileError(f"preset file {name} not found: give an existing YAML file or a preset name")
        return _parse(path)
    presets = _registry()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(sorted(presets))} or a preset .yaml file")
    return presets[name]


def is_preset(name: str) -> bool:
    """True when ``name`` is a registered preset name."""
    return name in _registry()
