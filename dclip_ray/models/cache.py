"""Models loaded once per process: Ray workers (and the driver's checks) reuse them across tasks.

The caches are plain module dictionaries keyed by the model's source; a process that loads a model
once keeps it (and the sha256 of its weights) for its lifetime.
"""

from __future__ import annotations

import torch

from dclip_ray.hashing import state_dict_sha256

from .base import BaseModel, load_base
from .trust import trust_scope
from .unet import load_unet

_BASES: dict[tuple[str, str | None], BaseModel] = {}
_UNETS: dict[str, torch.nn.Module] = {}
_SHAS: dict[str, str] = {}


def cached_base(model: str, preset: str | None = None, device: str = "cpu", trust_checkpoint: bool = False,
                sha256: str | None = None) -> BaseModel:
    """:func:`dclip_ray.models.base.load_base`, loaded once per process (Ray workers reuse it across
    tasks). ``trust_checkpoint`` lets a pickle holding more than tensors load (it can run code);
    ``sha256``: the weights' digest when the caller has it (not hashed again)."""
    key = (model, preset)
    if key not in _BASES:
        with trust_scope(trust_checkpoint):
            _BASES[key] = load_base(model, preset, sha256)
    base = _BASES[key]
    base.unet.to(device)
    return base


def cached_unet(src: str, device: str = "cpu", trust_checkpoint: bool = False) -> torch.nn.Module:
    """:func:`dclip_ray.models.load_unet` of a fine-tuned folder, loaded once per process."""
    if src not in _UNETS:
        _UNETS[src] = load_unet(src, trust_checkpoint=trust_checkpoint)
    return _UNETS[src].to(device)


def cached_unet_sha256(src: str, device: str = "cpu", trust_checkpoint: bool = False) -> str:
    """sha256 of a fine-tuned UNet's weights (:func:`dclip_ray.hashing.state_dict_sha256`), computed
    once per process."""
    if src not in _SHAS:
        _SHAS[src] = state_dict_sha256(cached_unet(src, device, trust_checkpoint))
    return _SHAS[src]
