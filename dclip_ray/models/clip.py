"""Frozen CLIP models (open_clip) from local weights, with differentiable preprocessing of
[-1, 1] image tensors and cached template-averaged text embeddings / directions."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.models.trust import is_trusted

from .presets import get_preset, is_preset, list_presets, resolve_package_path

log = logging.getLogger(__name__)

IMAGENET_TEMPLATES: tuple[str, ...] = tuple(
    line for line in Path(__file__).with_name("imagenet_templates.txt").read_text().splitlines() if line.strip()
)
"""The 79 ImageNet prompt templates of the official DiffusionCLIP / StyleGAN-NADA code."""

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# OpenAI's own model names (as in the official code's clip.load) -> the open_clip QuickGELU names
_OPENAI_NAMES = {"ViT-B/16": "ViT-B-16-quickgelu", "ViT-B/32": "ViT-B-32-quickgelu", "ViT-L/14": "ViT-L-14-quickgelu"}


def preprocess_for_clip(
    x: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
) -> torch.Tensor:
    """Differentiable CLIP preprocessing (no PIL): ``x: [B,3,H,W] in [-1,1]`` -> ``[B,3,size,size]``.

    Maps to [0, 1], resizes the shorter side to ``size`` (bicubic, antialiased), centre-crops
    ``size`` x ``size`` and normalises with ``mean`` / ``std`` (torchvision's Resize + CenterCrop
    + Normalize semantics).
    """
    x = (x + 1.0) / 2.0
    h, w = x.shape[-2:]
    if min(h, w) != size:
        if h <= w:
            nh, nw = size, int(size * w / h)
        else:
            nh, nw = int(size * h / w), size
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


class ClipModel:
    """A frozen open_clip model + tokenizer.

    ``encode_image(x: [B,3,H,W] in [-1,1]) -> [B,D]`` and ``encode_text(list[str]) -> [N,D]`` give
    L2-normalised embeddings; ``text_embedding`` and ``text_direction`` are cached per prompt.
    ``vocabulary``: texts zero-shot matching scores a source against besides the run's own (a preset's
    ``vocabulary``; empty for a general CLIP, where a neutral set suffices).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: object, name: str,
                 templates: Sequence[str] | None = None, vocabulary: Sequence[str] | None = None):
        self.model = model.eval()
        self.templates = tuple(templates or IMAGENET_TEMPLATES)
        self.vocabulary = tuple(vocabulary or ())
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean") or getattr(visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(cfg.get("std") or getattr(visual, "image_std", None) or OPENAI_STD)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def quick_gelu(self) -> bool:
        """True when the towers use QuickGELU (the activation OpenAI's weights were trained with)."""
        from open_clip.transformer import QuickGELU

        return any(isinstance(m, QuickGELU) for m in self.model.modules())

    def to(self, device: torch.device | str) -> ClipModel:
        """Move the model to ``device`` (clears the text cache)."""
        self.model.to(device)
        self._text_cache.clear()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B,3,H,W] in [-1,1]`` -> the model's normalised ``[B,3,S,S]`` input (differentiable)."""
        return preprocess_for_clip(x, self.image_size, self.mean, self.std)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B,3,H,W] in [-1,1]`` -> ``[B,D]`` L2-normalised; gradients flow to ``x``."""
        return _normalize(self.model.encode_image(self.preprocess(x.to(self.device))))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """``texts`` (N strings) -> ``[N,D]`` L2-normalised text embeddings (no gradient)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return _normalize(self.model.encode_text(tokens).float())

    def _template_features(self, prompt: str, templates: Sequence[str]) -> torch.Tensor:
        key = ("features", prompt, tuple(templates))
        if key not in self._text_cache:
            self._text_cache[key] = self.encode_text([t.format(prompt) for t in templates])
        return self._text_cache[key]

    def text_embedding(self, prompt: str, templates: Sequence[str] | None = None) -> torch.Tensor:
        """``[D]``: mean over ``templates`` (default: the model's, usually the 79 ImageNet ones) of the
        normalised embeddings of ``prompt``, renormalised (cached per prompt and template set)."""
        templates = tuple(templates or self.templates)
        key = ("embedding", prompt, tuple(templates))
        if key not in self._text_cache:
            self._text_cache[key] = _normalize(self._template_features(prompt, templates).mean(dim=0))
        return self._text_cache[key]

    def text_direction(self, source: str, target: str, templates: Sequence[str] | None = None) -> torch.Tensor:
        """``[D]`` unit text direction (official form): per template (default: the model's), normalised
        target minus normalised source embedding; averaged over templates and renormalised (cached)."""
        templates = tuple(templates or self.templates)
        key = ("direction", source, target, tuple(templates))
        if key not in self._text_cache:
            diff = self._template_features(target, templates) - self._template_features(source, templates)
            self._text_cache[key] = _normalize(diff.mean(dim=0))
        return self._text_cache[key]


class ClipEnsemble:
    """Several CLIP models with weights; losses average the per-model losses with these weights.

    ``members``: list of (ClipModel, weight), weights normalised to sum to 1.
    """

    def __init__(self, models: Sequence[ClipModel], weights: Sequence[float] | None = None):
        if not models:
            raise ConfigError("a CLIP ensemble needs at least one model")
        weights = [1.0] * len(models) if weights is None else list(weights)
        if len(weights) != len(models):
            raise ConfigError(f"CLIP ensemble: {len(models)} models but {len(weights)} weights; give one weight per model")
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"CLIP ensemble weights must be >= 0 with a positive sum, got {weights}")
        total = float(sum(weights))
        self.members: list[tuple[ClipModel, float]] = [(m, float(w) / total) for m, w in zip(models, weights, strict=True)]

    def __iter__(self):  # noqa: ANN204
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)


def _is_torchscript(path: str) -> bool:
    """True for a TorchScript archive (OpenAI's released CLIP ``.pt`` files)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _load_weights(model: torch.nn.Module, path: str, is_jit: bool) -> None:
    import open_clip

    try:
        if is_jit:
            with warnings.catch_warnings():  # torch.jit is deprecated, but it is OpenAI's release format
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(path, map_location="cpu").state_dict()
            # drop OpenAI's integer attributes and buffers the model keeps out of its state dict
            transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())
            for k in (*_JIT_EXTRA_KEYS, *transient):
                sd.pop(k, None)
            model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        else:
            open_clip.load_checkpoint(model, path, strict=True)
    except Exception as e:
        msg = " ".join(line.strip() for line in str(e).splitlines()[:2]) or type(e).__name__
        raise InputFileError(f"CLIP weights {path} do not load into this architecture: {msg[:200]}") from None


@dataclass
class _ClipSpec:
    """What :func:`load_clip`'s name-or-preset resolves to before anything is built."""

    model_name: str  # open_clip model name (OpenAI's own names already mapped)
    weights: str | None  # weights file (a preset's default filled in), None for random init
    config_dir: str | None  # folder of custom open_clip architecture JSON files, as given
    preset_quick_gelu: bool | None = None  # the preset's quick_gelu flag
    preset_name: str | None = None
    templates: Sequence[str] | None = None  # the preset's prompt templates
    vocabulary: Sequence[str] | None = None  # the preset's zero-shot vocabulary


def _resolve_clip_spec(
    name_or_preset: str, weights: str | None, model_config_dir: str | None) -> _ClipSpec:
    """Resolve a CLIP preset (its architecture, default weights, templates) or a plain open_clip /
    OpenAI model name; raise when a preset is not a CLIP one or its weights are missing."""
    model_name, config_dir, preset_qg, preset_name, templates = name_or_preset, model_config_dir, None, None, None
    vocabulary = None
    if is_preset(name_or_preset):
        p = get_preset(name_or_preset)
        if p.kind != "clip":
            raise ConfigError(f"preset {p.name} is a {p.kind} preset; give a CLIP preset ({', '.join(list_presets('clip'))})")
        preset_name = p.name
        model_name = p.architecture["model_name"]
        config_dir = config_dir or p.architecture.get("config_dir")
        preset_qg = p.architecture.get("quick_gelu")
        templates = p.architecture.get("templates")
        vocabulary = p.architecture.get("vocabulary")
        if weights is None and p.weights:
            weights = p.weights_path()
            if not os.path.exists(weights):
                raise InputFileError(f"preset {p.name}: its weights {weights} are not there yet; build them ({p.source.text})")
        if weights is None:
            raise ConfigError(f"CLIP preset {p.name} needs a weights file: pass --clip-weights PATH ({p.source.text})")
    model_name = _OPENAI_NAMES.get(model_name, model_name)
    return _ClipSpec(model_name, weights, config_dir, preset_qg, preset_name, templates, vocabulary)


def _check_model_name(model_name: str, config_dir: str | None) -> None:
    """Register ``config_dir`` (package-relative paths resolved) with open_clip, then raise unless
    open_clip knows ``model_name``."""
    import open_clip

    if config_dir:
        config_dir = resolve_package_path(config_dir)
        if not os.path.isdir(config_dir):
            raise InputFileError(f"open_clip model config folder {config_dir} not found")
        open_clip.add_model_config(config_dir)
    if model_name not in open_clip.list_models():
        raise ConfigError(f"unknown CLIP model {model_name!r}: give a CLIP preset ({', '.join(list_presets('clip'))}) or an open_clip model name")


def _check_weights(model_name: str, weights: str | None, trust_checkpoint: bool) -> bool:
    """Raise unless ``weights`` is an existing file and, when it is a TorchScript archive, trusted;
    returns whether it is a TorchScript archive."""
    if weights is None:
        raise ConfigError(f"CLIP model {model_name} needs a weights file: pass --clip-weights PATH (nothing is downloaded)")
    if weights is not None and not os.path.isfile(weights):
        raise InputFileError(f"CLIP weights {weights}: no such file; give a local .pt/.bin/.safetensors file")
    is_jit = weights is not None and _is_torchscript(weights)
    if is_jit and not is_trusted(trust_checkpoint):
        raise InputFileError(
            f"CLIP weights {weights} are a TorchScript archive, which holds code; re-run with --trust-checkpoint "
            "only if you trust its source (e.g. OpenAI's released .pt)"
        )
    return is_jit


def check_clip(name_or_preset: str, weights: str | None = None, trust_checkpoint: bool = False) -> None:
    """Raise (one line) unless :func:`load_clip` would find this CLIP and its weights file; loads nothing
    (what a command checks before Ray starts, for a CLIP that only its workers load)."""
    spec = _resolve_clip_spec(name_or_preset, weights, None)
    _check_weights(spec.model_name, spec.weights, trust_checkpoint)


def _use_quick_gelu(quick_gelu: bool | None, spec: _ClipSpec, is_jit: bool) -> bool:
    """``quick_gelu`` when given; else True for a preset that says so, TorchScript (OpenAI)
    archives, weights paths containing "openai" and ``*-quickgelu`` model names."""
    if quick_gelu is None:
        # OpenAI's weights were trained with QuickGELU; open_clip's plain names build GELU silently
        openai_file = spec.weights is not None and "openai" in str(spec.weights).lower()
        quick_gelu = bool(spec.preset_quick_gelu) or is_jit or openai_file or spec.model_name.endswith("-quickgelu")
    return quick_gelu


def load_clip(
    name_or_preset: str,
    weights: str | None = None,
    *,
    quick_gelu: bool | None = None,
    model_config_dir: str | None = None,
    device: str | torch.device = "cpu",
    trust_checkpoint: bool = False,
) -> ClipModel:
    """A frozen :class:`ClipModel` from a CLIP preset (``clip_vit_b16``, ``toy_clip`` ...) or an
    open_clip model name, with weights from a local file (open_clip state dict, safetensors, or
    OpenAI's TorchScript archive). Nothing is downloaded.

    QuickGELU is forced for presets that say so, for ``*-quickgelu`` names, OpenAI's names
    (``ViT-B/16``), TorchScript (OpenAI) archives and weights paths containing "openai";
    ``quick_gelu`` overrides. ``model_config_dir`` registers custom open_clip
    architecture JSON files first. State dicts load
    with ``weights_only=True``; a TorchScript archive (it holds code) loads only with
    ``trust_checkpoint`` (or the CLI's ``--trust-checkpoint``).
    """
    import open_clip

    spec = _resolve_clip_spec(name_or_preset, weights, model_config_dir)
    model_name, weights = spec.model_name, spec.weights
    _check_model_name(model_name, spec.config_dir)
    is_jit = _check_weights(model_name, weights, trust_checkpoint)
    quick_gelu = _use_quick_gelu(quick_gelu, spec, is_jit)
    with _quiet_no_pretrained():  # our weights load right below: open_clip's 'randomly initialised' is not news
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    _load_weights(model, weights, is_jit)
    model = model.float().to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    log.debug("loaded CLIP %s (preset %s, weights %s, quick_gelu %s)", model_name, spec.preset_name, weights, quick_gelu)
    return ClipModel(model, tokenizer, spec.preset_name or model_name, spec.templates, spec.vocabulary)


class _NoPretrainedFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_no_pretrained() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded" warning (logged on the root logger) while it runs."""
    f = _NoPretrainedFilter()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)
