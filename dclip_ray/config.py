"""The single declaration of every fine-tuning setting: :class:`FinetuneConfig`.

Each field is declared once, with its default, its help text, its value rule and the names it has on
every surface:

- the CLI option (``--lr``; `dclip-ray finetune` and `finetune-many` build their options from here,
  see :mod:`dclip_ray.cli.settings`),
- the prompt-line key (``lr=``; per-prompt settings only, see :mod:`dclip_ray.prompts.parse`),
- the workflow-spec key (``finetune.lr``, the CLI name with ``_``; :mod:`dclip_ray.workflow.spec`).

A value given on any surface is checked by the same rule (:func:`check_setting`), and a setting given
nowhere takes the same default (:func:`resolve_finetune_config`), which is also where the one t0 rule
lives: the prompt line's value, else the job's (CLI or spec), else the model preset's recommendation,
else the default. The preset also recommends the loss weights ``clip``, ``l1`` and ``id``.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from dclip_ray.errors import ConfigError

Mode = Literal["efficient", "full"]


def setting(default: Any, help: str, *, cli: str, prompt: str | None = None, spec: str | None = "",
            lo: float | None = None, lo_strict: bool = False, hi: float | None = None,
            choices: tuple[str, ...] | None = None, aliases: dict[str, str] | None = None) -> Any:
    """A dataclass field declared as a user-facing setting.

    ``cli``: the option name without dashes' prefix (``"n-gen"`` for ``--n-gen``); ``prompt``: the
    prompt-line key (None: not settable per prompt); ``spec``: the workflow-spec key ("" = the CLI name
    with ``_``, None = not in the spec's ``finetune`` section); ``lo``/``hi``/``choices``: the value rule;
    ``aliases``: other spellings of a choice (``{"none": ""}``), accepted on every surface.
    """
    meta = {"help": help, "cli": cli, "prompt": prompt, "spec": cli.replace("-", "_") if spec == "" else spec,
            "lo": lo, "lo_strict": lo_strict, "hi": hi, "choices": choices,
            "aliases": dict(aliases or {})}
    return field(default=default, metadata={"setting": meta})


@dataclass(frozen=True)
class SettingInfo:
    """One declared setting of a config class (see :func:`setting`)."""

    name: str
    type: type
    optional: bool
    default: Any
    help: str
    cli: str
    prompt: str | None
    spec: str | None
    lo: float | None
    lo_strict: bool
    hi: float | None
    choices: tuple[str, ...] | None
    aliases: dict[str, str]

    @property
    def option(self) -> str:
        """The CLI option, e.g. ``--n-gen``."""
        return f"--{self.cli}"

    def rule(self) -> str:
        """The value rule in words, e.g. ``an integer 1..999``, ``a number > 0``, ``one of efficient, full``."""
        if self.choices is not None:
            return "one of " + ", ".join([*self.aliases, *(c for c in self.choices if c)])
        if self.type is bool:
            return "true or false"
        kind = "an integer" if self.type is int else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} {self.lo:g}..{self.hi:g}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_strict else '>='} {self.lo:g}"
        return kind


def _base_type(tp: Any) -> tuple[type, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return str, False
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return _base_type(inner)[0], True
    return tp, False


def settings_of(cls: type) -> list[SettingInfo]:
    """The declared settings of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        meta = f.metadata.get("setting")
        if meta is None:
            continue
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else None
        out.append(SettingInfo(f.name, tp, optional, default, **meta))
    return out


def check_setting(s: SettingInfo, value: Any) -> Any:
    """``value`` converted to the setting's type and checked against its rule; raises ``ValueError``
    with ``"expected <rule>"`` (each surface adds where the value came from). None passes for an
    optional setting."""
    if value is None and s.optional:
        return None
    try:
        if s.type is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                v: Any = value.lower() in ("true", "1", "yes")
            else:
                v = bool(value)
        elif s.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            v = int(value, 10) if isinstance(value, str) else int(value)
        elif s.type is float:
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
        else:
            v = str(value)
            v = s.aliases.get(v, v)
    except (TypeError, ValueError):
        raise ValueError(f"expected {s.rule()}") from None
    if s.choices is not None and v not in s.choices:
        raise ValueError(f"expected {s.rule()}")
    if s.type in (int, float) and s.lo is not None and (v < s.lo or (s.lo_strict and v == s.lo)):
        raise ValueError(f"expected {s.rule()}")
    if s.type in (int, float) and s.hi is not None and v > s.hi:
        raise ValueError(f"expected {s.rule()}")
    return v


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuning run (recorded in ``dclip.json``); frozen.

    Every field but the prompt pair is a declared setting (:func:`setting`), validated on creation by
    the same rule that the CLI, the prompt parser and the workflow spec use.
    """

    source: str
    target: str
    t0: int = setting(500, "Return step t0 (the model preset's when not given).", cli="t0", prompt="t0",
                      spec=None, lo=1, hi=999)
    n_inv_steps: int = setting(40, "Inversion steps S_inv (must match cached latents).", cli="n-inv",
                               prompt="n_inv", spec=None, lo=2)
    n_gen_steps: int = setting(6, "Generation steps S_gen during training.", cli="n-gen", prompt="n_gen", lo=2)
    mode: Mode = setting("efficient", "'efficient' (loss per step) or 'full' (backprop through all steps).",
                         cli="mode", prompt="mode", choices=("efficient", "full"))
    epochs: int = setting(5, "Epochs over the training images.", cli="epochs", prompt="epochs", lo=1)
    batch_size: int = setting(1, "Images per optimiser step.", cli="batch-size", prompt="batch", lo=1)
    lr: float = setting(2e-6, "Adam learning rate (the paper's default; the toy world uses 5e-5).", cli="lr",
                        prompt="lr", lo=0, lo_strict=True)
    lr_gamma: float = setting(1.2, "Learning-rate factor applied after every epoch.", cli="lr-gamma",
                              prompt="lr_gamma", lo=0, lo_strict=True)
    w_clip: float = setting(3.0, "Weight of the directional CLIP loss (the preset's when not given).",
                            cli="clip-weight", prompt="clip", lo=0)
    w_l1: float = setting(0.0, "Weight of the L1 loss (the preset's when not given).", cli="l1", prompt="l1", lo=0)
    w_id: float = setting(0.0, "Weight of the face identity loss (needs --face-weights).", cli="id", prompt="id", lo=0)
    w_global: float = setting(0.0, "Weight of the global CLIP loss (eq. 8).", cli="global-weight", prompt="global",
                              lo=0)
    w_edge: float = setting(0.0, "Weight of the edge-structure loss (keeps where edges are; for colour/texture "
                            "edits, not shape edits).", cli="edge", prompt="edge", lo=0)
    edge_scales: int = setting(1, "Scales the edge loss compares: 1 pixels, 2 adds 2x2 averages, 3 adds 4x4.",
                               cli="edge-scales", prompt="edge_scales", lo=1)
    # Refinement stage (ours): from epoch `refine_from` (0-based; 0 = no stage) the L1 weight becomes
    # `refine_l1` and the edge loss compares `refine_edge_scales` scales. Lets an edit change colour
    # first and then hold the outline harder.
    refine_from: int = setting(0, "Epoch (0-based) from which the refinement stage applies (0 = none).",
                               cli="refine-from", prompt="refine", lo=0)
    refine_l1: float | None = setting(None, "L1 weight in the refinement stage (default: unchanged).",
                                      cli="refine-l1", prompt="refine_l1", lo=0)
    refine_edge_scales: int | None = setting(None, "Edge-loss scales in the refinement stage (default: unchanged).",
                                             cli="refine-edge-scales", prompt="refine_scales", lo=1)
    clip_form: Literal["cosine", "log"] = setting("log", "Directional loss form: 'log' (official) or 'cosine'.",
                                                  cli="clip-form", prompt="clip_form", choices=("cosine", "log"))
    aug_views: int = setting(4, "Augmented CLIP views per loss (0 = off).", cli="aug-views", prompt="views", lo=0)
    aug_shift: int = setting(3, "Largest random shift (pixels) of the augmented CLIP views.", cli="aug-shift",
                             prompt="shift", lo=0)
    aug_noise: float = setting(0.1, "Gaussian noise std (on [-1,1]) added to the augmented CLIP views.",
                               cli="aug-noise", prompt="noise", lo=0)
    aug_blur: float = setting(0.0, "Largest Gaussian blur sigma (pixels) of the augmented CLIP views (0 = none).",
                              cli="aug-blur", prompt="blur", lo=0)
    aug_flip: str = setting("", "Random flips of the augmented CLIP views: none, h (left-right), hv (both).",
                            cli="aug-flip", prompt="flip", choices=("", "h", "hv"), aliases={"none": ""})
    seed: int = setting(0, "Random seed (CPU runs are deterministic).", cli="seed", prompt="seed", lo=0)
    grad_checkpointing: bool = setting(False, "Recompute activations in backward (less memory).",
                                       cli="grad-checkpointing")
    bf16: bool = setting(False, "bf16 autocast (GPU only).", cli="bf16")
    checkpoint_every: int = setting(0, "Batches between checkpoints (0: at each epoch end only).",
                                    cli="checkpoint-every", lo=0)

    def __post_init__(self) -> None:
        for s in settings_of(type(self)):
            try:
                value = check_setting(s, getattr(self, s.name))
            except ValueError as e:
                raise ConfigError(f"{s.name}={getattr(self, s.name)!r}: {e}") from None
            object.__setattr__(self, s.name, value)
        self.augment()  # validates the augmentation as a whole

    def augment(self) -> Any:
        """The CLIP-input augmentation this config asks for (:class:`dclip_ray.losses.Augment`)."""
        from dclip_ray.losses import Augment

        return Augment(self.aug_views, self.aug_shift, self.aug_noise, self.aug_blur, self.aug_flip)

    def edit_loss(self, clip: Any, face: Any = None, epoch: int = 0) -> Any:
        """The objective for ``epoch`` (0-based): the refinement-stage weights from ``refine_from`` on."""
        from dclip_ray.losses import EditLoss

        refining = 0 < self.refine_from <= epoch
        w_l1 = self.refine_l1 if refining and self.refine_l1 is not None else self.w_l1
        scales = self.refine_edge_scales if refining and self.refine_edge_scales is not None else self.edge_scales
        return EditLoss(clip, self.source, self.target, self.w_clip, w_l1, self.w_id, face, self.clip_form,
                        self.augment(), w_global=self.w_global, w_edge=self.w_edge, edge_scales=scales)


PRESET_RECOMMENDS = {"t0": "t0", "w_clip": "clip", "w_l1": "l1", "w_id": "id"}
"""Settings a model preset recommends (config field -> attribute of the preset or its ``loss_weights``)."""


def _preset_value(preset: Any, name: str) -> Any:
    attr = PRESET_RECOMMENDS.get(name)
    if preset is None or attr is None:
        return None
    if attr == "t0":
        return getattr(preset, "t0", None)
    return getattr(getattr(preset, "loss_weights", None), attr, None)


def resolve_finetune_config(source: str, target: str, *layers: Mapping[str, Any] | None,
                            preset: Any = None) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of one edit from its sources, most specific first.

    ``layers``: ``{field name: value}`` mappings (a prompt line's options, then the job's CLI or spec
    values); a missing or None value falls through to the next layer, then to the model preset's
    recommendation (t0 and the clip/l1/id weights), then to the declared default. This is the one t0
    rule of every command. Raises :class:`ConfigError` naming the setting on a bad value or an
    unknown name.
    """
    known = {s.name for s in settings_of(FinetuneConfig)}
    values: dict[str, Any] = {}
    for layer in layers:
        for name, value in (layer or {}).items():
            if name not in known:
                raise ConfigError(f"unknown fine-tuning setting {name!r}; use one of {', '.join(sorted(known))}")
            if value is not None and name not in values:
                values[name] = value
    for name in PRESET_RECOMMENDS:
        if name not in values and _preset_value(preset, name) is not None:
            values[name] = _preset_value(preset, name)
    return FinetuneConfig(source=source, target=target, **values)
