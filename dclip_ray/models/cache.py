"""Models loaded once per process: Ray workers (and the driver's checks) reuse them across tasks.

The caches are plain module dictionaries keyed by the model's source; a process that loads a model
once keeps it (and the sha256 of its weights) for its lifetime.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dclip_ray.adapters import AdapterBank, adapter_sha256
from dclip_ray.hashing import state_dict_sha256
from dclip_ray.urls import redact

from .base import BaseModel, check_base_model, load_base
from .card import ModelCard, read_card
from .trust import trust_scope
from .unet import eps_fn_of, load_unet, local_copy

_BASES: dict[tuple[str, str | None], BaseModel] = {}
_UNETS: dict[str, torch.nn.Module] = {}
_SHAS: dict[str, str] = {}
_BANKS: dict[tuple[str, str | None, str], tuple[AdapterBank, dict[str, int]]] = {}


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


def cached_unet_sha256(src: str, device: str = "cpu", trust_checkpoint: bool = False,
                       card: ModelCard | None = None) -> str:
    """sha256 of a fine-tuned UNet's weights (:func:`dclip_ray.hashing.state_dict_sha256`), computed
    once per process; ``card``: the folder's card when the caller has read it."""
    if src not in _SHAS:
        card = card if card is not None else read_card(src)
        if card.is_adapter:  # named by its base, config and LoRA weights: no merged copy
            with local_copy(src) as local:
                _SHAS[src] = adapter_sha256(local, card.base_model_sha256)
        else:
            _SHAS[src] = state_dict_sha256(cached_unet(src, device, trust_checkpoint))
    return _SHAS[src]


def model_eps_fns(base_src: str, preset: str | None, base: BaseModel, finetuned: list[str], device: str = "cpu",
                  trust_checkpoint: bool = False, cards: list[ModelCard] | None = None,
                  ) -> list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The noise predictions of the base (index 0) and each fine-tuned model (1..M), loaded once per
    process: full fine-tuned UNets each as their own module; LoRA adapter folders all on ONE
    :class:`~dclip_ray.adapters.AdapterBank` over ``base`` (refused when their card names another base).
    ``base_src``/``preset``: the base's source, the bank's cache key; ``cards``: the models' cards when the
    caller has read them (else each ``dclip.json`` is read here)."""
    fns = [eps_fn_of(base.unet)]
    bank_key = (base_src, preset, device)
    cards = cards if cards is not None else [read_card(src) for src in finetuned]
    for src, card in zip(finetuned, cards, strict=True):
        if not card.is_adapter:
            fns.append(eps_fn_of(cached_unet(src, device, trust_checkpoint)))
            continue
        if bank_key not in _BANKS:
            _BANKS[bank_key] = (AdapterBank(base.unet), {})
        bank, index = _BANKS[bank_key]
        if src not in index:
            check_base_model(base.sha256, redact(base_src), {src: card})  # an adapter of another base is refused
            with local_copy(src) as local:  # the bank keeps the factors in memory: the copy can go
                index[src] = bank.add(local)
        fns.append(bank.eps_fn(index[src]))
    return fns
