"""The toy world: a synthetic dataset, an independent judge and tiny bundled models.

Coloured shapes (``COLOURS`` x ``SHAPES``) on a plain background, rendered deterministically
(:func:`render`, :func:`sample_dataset`); a pixel-reading :func:`judge` (no learned network) that
scores edits; and the bundled weights trained by our own scripts: a 32x32 DDPM ``UNet2DModel``
(:func:`toy_unet_path`) and a tiny open_clip ViT (:func:`toy_clip_paths`). Model cards:
``weights/toy_unet/README.md`` and ``weights/TOY_CLIP.md``.
"""

from __future__ import annotations

from pathlib import Path

from .judge import JudgeResult, judge, judge_batch
from .render import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    SIZE,
    Sample,
    ShapeParams,
    caption,
    render,
    sample_dataset,
)

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "SHAPES",
    "SIZE",
    "JudgeResult",
    "Sample",
    "ShapeParams",
    "TOY_CLIP_MODEL_NAME",
    "caption",
    "judge",
    "judge_batch",
    "render",
    "sample_dataset",
    "toy_clip_paths",
    "toy_unet_path",
]

_HERE = Path(__file__).resolve().parent

TOY_CLIP_MODEL_NAME = "toy-clip-vit"
"""The open_clip model-config name of the bundled tiny CLIP (``model_configs/toy-clip-vit.json``)."""


def toy_unet_path() -> Path:
    """The bundled toy DDPM: a ``UNet2DModel.save_pretrained`` folder with ``scheduler_config.json``."""
    return _HERE / "weights" / "toy_unet"


def toy_clip_paths() -> tuple[str, Path, Path]:
    """The bundled tiny CLIP as ``(model_name, config_folder, weights_file)``.

    Load it with open_clip: ``open_clip.add_model_config(config_folder)`` then
    ``open_clip.create_model_and_transforms(model_name, pretrained=str(weights_file))``.
    """
    return TOY_CLIP_MODEL_NAME, _HERE / "model_configs", _HERE / "weights" / "toy_clip.safetensors"
