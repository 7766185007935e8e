"""Pretrained models from local files: UNet loaders and checkpoint conversion, presets, CLIP and
the face-identity network. Nothing here downloads anything."""

from __future__ import annotations

from .clip import IMAGENET_TEMPLATES, ClipEnsemble, ClipModel, load_clip, preprocess_for_clip
from .convert import (
    adm_unet_config,
    convert_adm_state_dict,
    convert_ddim_state_dict,
    ddpm_unet_config,
    detect_format,
)
from .face import FaceIdentity, load_face
from .presets import Preset, get_preset, is_preset, list_presets
from .trust import is_trusted, trust_scope
from .unet import convert_checkpoint, eps_fn_of, load_schedule_config, load_unet, read_state_dict

__all__ = [
    "IMAGENET_TEMPLATES",
    "ClipEnsemble",
    "ClipModel",
    "FaceIdentity",
    "Preset",
    "adm_unet_config",
    "convert_adm_state_dict",
    "convert_checkpoint",
    "convert_ddim_state_dict",
    "ddpm_unet_config",
    "detect_format",
    "eps_fn_of",
    "get_preset",
    "is_preset",
    "is_trusted",
    "list_presets",
    "load_clip",
    "load_face",
    "load_schedule_config",
    "load_unet",
    "preprocess_for_clip",
    "read_state_dict",
    "trust_scope",
]
