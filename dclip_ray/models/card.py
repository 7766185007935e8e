"""The model card of a fine-tuned model: ``dclip.json`` beside its weights, typed (:class:`ModelCard`).

:func:`save_finetuned <dclip_ray.finetune.save_finetuned>` and :func:`~dclip_ray.finetune.copy_model` write it
with :func:`write_card`, last (its presence marks the folder complete); every reader goes through
:func:`read_card`, local folders and fsspec URLs alike. A caller that needs several facts of a model reads
its card once and passes the :class:`ModelCard` on (a restyle reads each model's card once before Ray starts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dclip_ray.adapters import ADAPTER_FORMAT
from dclip_ray.errors import InputFileError
from dclip_ray.urls import redact

CARD_FILE = "dclip.json"

CARD_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "source": str, "target": str, "base_model": str, "base_model_sha256": str, "prompt_name": str,
    "quality": dict, "metrics": dict, "format": str}
"""The model-card fields every reader relies on, and their JSON types (others pass as they are)."""


@dataclass(frozen=True)
class ModelCard:
    """A fine-tuned model's ``dclip.json``: the edit it was trained for (``source`` -> ``target``), its
    training ``config`` (FinetuneConfig's fields), the base model it was fine-tuned from (``base_model``,
    ``base_model_sha256``), its ``format`` (a full UNet or a LoRA adapter), the CLIP it was guided by
    (``clip``, ``clip_weights``) and its quality check. ``data`` holds the whole card as read (loss history,
    metrics, restarts...); ``where`` names it in messages. A folder without a card reads as an empty card."""

    where: str = ""
    source: str | None = None
    target: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    base_model_sha256: str | None = None
    format: str | None = None
    clip: str | None = None
    clip_weights: str | None = None
    quality: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: Any, where: str) -> ModelCard:
        """The card of the JSON value ``data`` (read from ``where``); :class:`InputFileError` naming the field
        when it is not an object, a field of :data:`CARD_TYPES` has another type, or ``config.t0`` is not a
        step in 1..999."""
        check_card(data, where)
        weights = data.get("clip_weights")
        return cls(where, data.get("source"), data.get("target"), dict(data.get("config") or {}),
                   data.get("base_model"), data.get("base_model_sha256"), data.get("format"),
                   data.get("clip") or None, None if weights in (None, "", "None") else str(weights),
                   data.get("quality"), dict(data))

    @property
    def exists(self) -> bool:
        """False for a folder without a card (a plain diffusers folder)."""
        return bool(self.data)

    @property
    def t0(self) -> int | None:
        """The return step it was trained at (None when the card does not say)."""
        t0 = self.config.get("t0")
        return int(t0) if t0 else None

    @property
    def edits(self) -> list[list[str]]:
        """``[[source, target]]`` (empty when the card names no edit)."""
        return [[self.source, self.target]] if self.source and self.target else []

    @property
    def is_adapter(self) -> bool:
        """True for a LoRA adapter folder (its weights apply to ``base_model_sha256``'s model)."""
        return self.format == ADAPTER_FORMAT


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


def read_card(folder: str) -> ModelCard:
    """The card of the fine-tuned model folder ``folder`` (local path, ``file://`` or fsspec URL); an empty
    card when it has none. :class:`InputFileError` when the card is there but cannot be read (permissions, a
    failing object store: never taken for "no card"), is not valid JSON or has a field of the wrong type."""
    import json

    import fsspec

    url = f"{folder.rstrip('/')}/{CARD_FILE}"
    where = redact(url)
    try:
        with fsspec.open(url, "rb") as f:
            text = f.read().decode()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return ModelCard(where)
    except OSError as e:
        raise InputFileError(f"{where}: cannot be read ({e}); check the model folder and its access") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InputFileError(f"{where}: not valid JSON ({e}); re-save the fine-tuned model") from None
    return ModelCard.from_data(data, where)


def write_card(folder: str, card: Mapping[str, Any]) -> None:
    """Write ``card`` as ``folder/dclip.json`` (local path or fsspec URL; strict JSON: NaN and inf become
    null) through a temporary name, last: its presence marks the model folder complete."""
    import fsspec

    from dclip_ray import plain

    fs, path = fsspec.core.url_to_fs(folder)
    base = path.rstrip("/")
    fs.makedirs(base, exist_ok=True)
    with fs.open(f"{base}/{CARD_FILE}.tmp", "w") as f:
        f.write(plain.dumps(dict(card)))
    fs.mv(f"{base}/{CARD_FILE}.tmp", f"{base}/{CARD_FILE}")
