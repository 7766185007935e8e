"""The single declaration of every user-facing setting: one frozen config per stage.

Each field of :class:`FinetuneConfig` (and of the other stage configs below) is declared once, with
its default, its help text, its value rule and the names it has on every surface:

- the CLI option (``--lr``; `dclip-ray finetune` and `finetune-many` build their options from here,
  see :mod:`dclip_ray.cli.settings`),
- the prompt-line key (``lr=``; per-prompt settings only, see :mod:`dclip_ray.prompts.parse`),
- the workflow-spec field, a dotted path (``finetune.lr``: by default the config's section and the CLI
  name with ``_``; :mod:`dclip_ray.workflow.spec` builds its sections from these declarations).

The other stages declare theirs the same way: :class:`PrecomputeConfig` (`dclip-ray precompute`, the
spec's ``latents`` section), :class:`RestyleSettings` (`restyle` and `edit`, the spec's ``restyle``
section) and :class:`Resources` (what each unit of Ray work takes). A setting that two stages share
(t0, S_inv, the resize policy, ...) is declared once in :data:`SHARED` and used by both; two settings
with one spec path (``latents.t0`` is precompute's and fine-tuning's t0) agree on default and rule.
:data:`NOT_IN_SPEC` names the few settings a workflow spec takes from elsewhere, and why.

A value given on any surface is checked by the same rule (:func:`check_setting`), and a setting given
nowhere takes the same default (:func:`resolve_finetune_config`), which is also where the one t0 rule
lives: the prompt line's value, else the job's (CLI or spec), else the model preset's recommendation,
else the default. The preset also recommends the loss weights ``clip``, ``l1`` and ``id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from dclip_ray.errors import ConfigError
from dclip_ray.job_configs import (
    PrecomputeConfig,
    QualityCheck,
    Resources,
    RestyleSettings,
    RunOptions,
    TrainingSets,
    TranslateSettings,
)
from dclip_ray.recipes import get_recipe, recipe_names
from dclip_ray.settings import (
    SHARED,
    SettingInfo,
    check_setting,
    setting,
    settings_of,
    shared,
    validate_settings,
)

__all__ = [
    "CONFIGS", "NOT_IN_SPEC", "SHARED", "FinetuneConfig", "PrecomputeConfig", "QualityCheck", "Resources",
    "RestyleSettings", "RunOptions",
    "SettingInfo", "TrainingSets", "TranslateSettings", "check_setting", "resolve_finetune_config", "setting", "settings_of", "shared",
    "spec_settings",
]

Mode = Literal["efficient", "full"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuning run (recorded in ``dclip.json``); frozen.

    Every field but the prompt pair is a declared setting (:func:`setting`), validated on creation by
    the same rule that the CLI, the prompt parser and the workflow spec use.
    """

    source: str
    target: str
    SPEC_SECTION: ClassVar[str] = "finetune"

    recipe: str | None = setting(None, "Fine-tuning recipe (`dclip-ray recipes list`): its settings where none is "
                                 "given (default: the edit preset's, else the model preset's).", cli="recipe",
                                 prompt="recipe", choices=recipe_names())

    t0: int = shared("t0", help="Return step t0 (the model preset's when not given).", prompt="t0",
                     spec="latents.t0")
    n_inv_steps: int = shared("n_inv_steps", help="Inversion steps S_inv (must match cached latents).",
                              prompt="n_inv", spec="latents.n_inv")
    n_gen_steps: int = setting(6, "Generation steps S_gen during training.", cli="n-gen", prompt="n_gen", lo=2)
    mode: Mode = setting("efficient", "'efficient' (loss per step) or 'full' (backprop through all steps).",
                         cli="mode", prompt="mode", choices=("efficient", "full"))
    n_train: int = setting(16, "Training images (finetune-many: the first that match the prompt's source).",
                           cli="n-train", prompt="n_train", lo=1)
    epochs: int = setting(5, "Epochs over the training images.", cli="epochs", prompt="epochs", lo=1)
    batch_size: int = setting(1, "Images per optimiser step.", cli="batch-size", prompt="batch", lo=1)
    lr: float = setting(2e-6, "Adam learning rate.", cli="lr",
                        prompt="lr", lo=0, lo_strict=True)
    lr_gamma: float = setting(1.2, "Learning-rate factor applied after every epoch.", cli="lr-gamma",
                              prompt="lr_gamma", lo=0, lo_strict=True)
    w_clip: float = setting(3.0, "Weight of the directional CLIP loss (the preset's when not given).",
                            cli="clip-weight", prompt="clip_weight", lo=0,
                            renamed_from="clip")
    w_l1: float = setting(0.0, "Weight of the L1 loss (the preset's when not given).", cli="l1", prompt="l1", lo=0)
    w_id: float = setting(0.0, "Weight of the face identity loss (needs --face-weights).", cli="id", prompt="id", lo=0)
    w_global: float = setting(0.0, "Weight of the global CLIP loss (eq. 8).", cli="global-weight", prompt="global",
                              lo=0)
    w_edge: float = setting(0.0, "Weight of the edge-structure loss (keeps where edges are; for colour/texture "
                            "edits, not shape edits).", cli="edge", prompt="edge", lo=0)
    edge_scales: int = setting(1, "Scales the edge loss compares: 1 pixels, 2 adds 2x2 averages, 3 adds 4x4.",
                               cli="edge-scales", prompt="edge_scales", lo=1)
    edge_match: Literal["absolute", "contrast"] = setting(
        "absolute", "What the edge loss compares: 'absolute' edge magnitudes, or 'contrast': each edge map scaled "
        "to the input's mean edge strength first, so a recolour in place costs nothing whatever the new colour's "
        "contrast.", cli="edge-match", prompt="edge_match", choices=("absolute", "contrast"))
    w_frame: float = setting(0.0, "Weight of an L1 loss on the outer frame only (1/8 of the side on each edge, "
                             "where an object-centred image has its background): charges a tinted or changed "
                             "background directly. 0 for edits of the whole picture.", cli="frame", prompt="frame",
                             lo=0)
    w_layout: float = setting(0.0, "Weight of the layout loss: how far apart every two pixels' colours are, "
                              "relative to the image's mean, kept (a recolour in place costs ~0, a rounded corner "
                              "or moved outline costs). For colour/texture edits, not shape edits.", cli="layout",
                              prompt="layout", lo=0)
    w_palette: float = setting(0.0, "Weight of the palette loss: every output pixel's colour kept near SOME colour "
                               "of the input (a shape grown in its own colour costs ~0, a drift to another colour "
                               "or a tinted background costs). For shape edits, not colour edits.", cli="palette",
                               prompt="palette", lo=0)
    # Refinement stage (ours): from epoch `refine_from` (0-based; 0 = no stage) the L1 weight becomes
    # `refine_l1`, the edge loss compares `refine_edge_scales` scales and the layout weight becomes
    # `refine_layout`. Lets an edit change colour first and then hold the outline harder.
    refine_from: int = setting(0, "Epoch (0-based) from which the refinement stage applies (0 = none).",
                               cli="refine-from", prompt="refine", lo=0)
    refine_l1: float | None = setting(None, "L1 weight in the refinement stage (default: unchanged).",
                                      cli="refine-l1", prompt="refine_l1", lo=0)
    refine_edge_scales: int | None = setting(None, "Edge-loss scales in the refinement stage (default: unchanged).",
                                             cli="refine-edge-scales", prompt="refine_scales", lo=1)
    refine_layout: float | None = setting(None, "Layout-loss weight in the refinement stage (default: unchanged). "
                                          "A recolour whose path passes near the background's colour (red -> "
                                          "blue on grey) crosses a layout barrier, so hold the layout once the "
                                          "colour has changed.", cli="refine-layout", prompt="refine_layout", lo=0)
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
    adapter: Literal["full", "lora"] = setting("full", "What is trained: 'full' (every weight of a UNet copy) or "
                                              "'lora' (low-rank adapters; saved as a small adapter on the base).",
                                              cli="adapter", prompt="adapter", choices=("full", "lora"))
    lora_rank: int = setting(8, "LoRA rank (--adapter lora).", cli="rank", prompt="rank", lo=1)
    seed: int = setting(0, "Random seed (a CPU run reproduces its model at the same torch thread count, which the card "
                               "records as torch_threads; OMP_NUM_THREADS=N fixes it).", cli="seed", prompt="seed", lo=0)
    restarts: int = setting(1, "Fine-tunings from seeds seed..seed+N-1, run side by side as far as the resources "
                            "allow; the one whose edits of held-aside images score best (and pass the check) is "
                            "kept, every restart's score goes into the model card.", cli="restarts",
                            prompt="restarts", lo=1)
    search_trials: int = setting(1, "Knob settings tried around the recipe (t0 +-50, lr, L1 and edge weight "
                                 "x0.5/x1/x2; the recipe's own first; 1: only it), each at every restart's seed; "
                                 "the best by the check's score on held-aside images is kept (`finetune --search`: "
                                 "8). A t0 other than the line's needs --images or latents at that t0.",
                                 cli="search-trials", prompt="search", lo=1)
    grad_checkpointing: bool = setting(False, "Recompute activations in backward (less memory).",
                                       cli="grad-checkpointing")
    bf16: bool = setting(False, "bf16 autocast (GPU only).", cli="bf16")
    checkpoint_every: int = setting(0, "Batches between checkpoints (0: at each epoch end only).",
                                    cli="checkpoint-every", lo=0)

    def __post_init__(self) -> None:
        validate_settings(self)
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
        w_layout = self.refine_layout if refining and self.refine_layout is not None else self.w_layout
        return EditLoss(clip, self.source, self.target, self.w_clip, w_l1, self.w_id, face, self.clip_form,
                        self.augment(), w_global=self.w_global, w_edge=self.w_edge, edge_scales=scales,
                        edge_contrast=self.edge_match == "contrast", w_frame=self.w_frame,
                        w_layout=w_layout, w_palette=self.w_palette)


PRESET_RECOMMENDS = {"t0": "t0", "w_clip": "clip", "w_l1": "l1", "w_id": "id"}
"""Settings a model preset recommends (config field -> attribute of the preset or its ``loss_weights``)."""


def _preset_value(preset: Any, name: str) -> Any:
    attr = PRESET_RECOMMENDS.get(name)
    if preset is None or attr is None:
        return None
    if attr == "t0":
        return getattr(preset, "t0", None)
    return getattr(getattr(preset, "loss_weights", None), attr, None)


def recipe_settings(name: str, adapter: str | None = None) -> dict[str, Any]:
    """The recipe ``name``'s settings as ``{FinetuneConfig field: value}`` (with its ``lora`` values when
    the adapter is "lora": ``adapter`` as given, else the recipe's own ``adapter``), each checked by its
    declared rule (:class:`ConfigError` naming the recipe and the key otherwise)."""
    by_key = {s.prompt: s for s in settings_of(FinetuneConfig) if s.prompt}
    out = {}
    recipe = get_recipe(name)
    adapter = adapter or recipe.settings.get("adapter")
    for key, value in {**recipe.settings, **(recipe.lora if adapter == "lora" else {})}.items():
        if key not in by_key or key == "recipe":
            raise ConfigError(f"recipe {name!r}: unknown setting {key!r}; use prompt-line keys ({', '.join(by_key)})")
        try:
            out[by_key[key].name] = check_setting(by_key[key], value)
        except ValueError as e:
            raise ConfigError(f"recipe {name!r}: {key}={value!r}: {e}") from None
    return out


def preset_recipe(preset: Any, source: str, target: str) -> str | None:
    """The recipe a model preset gives an edit that names none: the recipe of the first word of its
    ``recipe_when_changed`` that is in the source or the target but not in both ("red circle" -> "red
    square" changes circle and square), else its ``recipe`` (None without a preset)."""
    changed = set(source.lower().split()) ^ set(target.lower().split())
    for word, recipe in (getattr(preset, "recipe_when_changed", None) or {}).items():
        if word.lower() in changed:
            return recipe
    return getattr(preset, "recipe", None)


def _fill(values: dict[str, Any], more: Mapping[str, Any]) -> None:
    for name, value in more.items():
        if value is not None and name not in values:
            values[name] = value


def resolve_finetune_config(source: str, target: str, *layers: Mapping[str, Any] | None,
                            preset: Any = None, edit_preset: Any = None) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of one edit from its sources, most specific first.

    ``layers``: ``{field name: value}`` mappings (a prompt line's options, then the job's CLI or spec
    values); a missing or None value falls through to the next source. The order, the one rule of every
    command: the layers; the recipe they name (``recipe``); the edit preset's t0 (``edit_preset``, a
    bare preset line's :class:`~dclip_ray.prompts.presets.EditPreset`); the edit preset's recipe; the
    model preset's recipe for this edit (``preset``, :func:`preset_recipe`); the model preset's t0 and
    loss weights; the declared default.
    The recipe used is recorded in the config's ``recipe``. Raises :class:`ConfigError` naming the
    setting on a bad value or an unknown name.
    """
    known = {s.name for s in settings_of(FinetuneConfig)}
    values: dict[str, Any] = {}
    for layer in layers:
        unknown = set(layer or {}) - known
        if unknown:
            raise ConfigError(f"unknown fine-tuning setting {sorted(unknown)[0]!r}; use one of {', '.join(sorted(known))}")
        _fill(values, layer or {})
    if values.get("recipe"):
        _fill(values, recipe_settings(values["recipe"], values.get("adapter")))
    _fill(values, {"t0": getattr(edit_preset, "t0", None)})
    for recipe in (getattr(edit_preset, "recipe", None), preset_recipe(preset, source, target)):
        if not values.get("recipe") and recipe:
            values["recipe"] = recipe
            _fill(values, recipe_settings(recipe, values.get("adapter")))
    _fill(values, {name: _preset_value(preset, name) for name in PRESET_RECOMMENDS})
    return FinetuneConfig(source=source, target=target, **values)


CONFIGS: tuple[type, ...] = (PrecomputeConfig, FinetuneConfig, TrainingSets, QualityCheck, RestyleSettings,
                             Resources, RunOptions, TranslateSettings)
"""Every config class whose fields are user-facing settings."""

NOT_IN_SPEC: dict[tuple[str, str], str] = {
    ("RestyleSettings", "t0"): "a workflow restyles at the t0 its models were fine-tuned with (latents.t0 or "
                               "a prompt line's t0=)",
    ("RunOptions", "score_clip"): "a workflow scores with the CLIP its models were fine-tuned with",
    ("RunOptions", "score_clip_weights"): "as score_clip",
    ("RunOptions", "trust_checkpoint"): "a spec never unpickles code: convert such a checkpoint first "
                                        "(`dclip-ray convert --trust-checkpoint`)",
    ("RunOptions", "as_json"): "`dclip-ray run --json`",
    ("RunOptions", "verbose"): "`dclip-ray run --verbose`",
    ("RunOptions", "quiet"): "`dclip-ray run --quiet`",
    **{("TranslateSettings", s.name): "translate and from-strokes are commands, not workflow steps"
       for s in settings_of(TranslateSettings)},
}
"""Settings with no workflow-spec field of their own: (config class, field) -> where the spec takes it from."""


def spec_settings(section: str) -> list[SettingInfo]:
    """The declared settings that are fields of the workflow spec's ``section``, one per spec path (the
    first config in :data:`CONFIGS` declaring it; every other declaration of that path must agree on
    default and rule, checked here so a disagreement fails at import)."""
    seen: dict[str, SettingInfo] = {}
    for cls in CONFIGS:
        for s in settings_of(cls):
            if s.spec_section != section:
                continue
            first = seen.setdefault(s.spec or "", s)
            same = (first.type, first.lo, first.lo_strict, first.hi, first.choices, first.default)
            if (s.type, s.lo, s.lo_strict, s.hi, s.choices, s.default) != same:
                raise TypeError(f"{s.spec} is declared twice with different defaults or rules ({first.name}, {s.name})")
    return list(seen.values())
