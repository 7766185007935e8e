"""Restyle configuration (no Ray): options -> :class:`RestyleConfig`, the checks a restyle runs before any
work and the run's declaration (``restyle.json``); what the latent store covers and the ``--dry-run``
plan are in :mod:`.restyle_plan`.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from typing import Any

import fsspec

from dclip_ray.config import RestyleSettings
from dclip_ray.diffusion import generation_pairs
from dclip_ray.errors import ConfigError, DclipError
from dclip_ray.io.latents import store_root
from dclip_ray.io.locations import check_outputs
from dclip_ray.io.shards import put_bytes
from dclip_ray.mixing import mix_from_data, validate_gamma
from dclip_ray.models.base import check_base_model, edit_t0
from dclip_ray.models.cache import cached_base
from dclip_ray.models.card import ModelCard, read_card
from dclip_ray.models.presets import get_preset, list_presets
from dclip_ray.urls import is_url, redact

from .checks import check_out_folder, check_step_counts, check_steps
from .inputs import absolute
from .restyle import (
    RestyleConfig,
    Variant,
    gamma_of,
)
from .restyle_plan import latent_coverage, latents_current, restyle_plan


def variant_name(path: str) -> str:
    """Output sub-folder name of a fine-tuned model folder (its base name)."""
    from dclip_ray.prompts import safe_name

    return safe_name(posixpath.basename(path.rstrip("/")), fallback="model")


def build_restyle_config(
    out: str,
    models: list[str] | None = None,
    base: str | None = None,
    mix: dict[str, Any] | None = None,
    preset: str | None = None,
    settings: RestyleSettings | None = None,
    latents: str | None = None,
    trust_checkpoint: bool = False,
    clip: str | None = None,
    clip_weights: str | None = None,
    score_clip: str | None = None,
    score_clip_weights: str | None = None,
    face_weights: str | None = None,
    **given: Any,
) -> RestyleConfig:
    """Turn the restyle options into a :class:`RestyleConfig`: one output folder ``out/{name}`` per
    variant, whatever their number. ``models`` (fine-tuned folders) give one variant each, named after
    the folder, sharing one inversion per image and t0; ``mix`` (``{"models", "gamma"}``, eq. 14) gives
    the one variant ``out/mix``. ``settings``: the :class:`RestyleSettings`, or its fields as keywords
    (``n_gen_steps=20``; the same declared rules). Strength r: ``(1 - r) * eps_base + r * eps_ft``.
    ``base``: default the cards' ``base_model``; each variant's t0 is its models' (:func:`_t0_of`);
    routing: :func:`_route`; ``clip``/``score_clip`` and weights: :func:`_clips`; ``face_weights``: a face
    network whose cosine before/after joins the scores."""
    if settings is not None and given:
        raise TypeError(f"give either settings or its fields, not both ({sorted(given)})")
    rs = settings or RestyleSettings(**given)
    finetuned, spec = _models(models, mix)
    cards = [read_card(m) for m in finetuned]  # each model's card, read once
    base = base or cards[0].base_model
    if not base:
        raise ConfigError(f"{finetuned[0]} does not name its base model: pass --base MODEL (the original UNet)")

    def t0_of(indices: list[int]) -> int:  # the one rule, over the variant's fine-tuned models
        return _t0_of([cards[i - 1] for i in indices if i > 0], rs.t0, base, preset)

    variants = _variants(out, finetuned, spec, rs.strength, cards, t0_of)
    for v in variants:
        check_step_counts(v.t0, rs.n_inv_steps, rs.n_gen_steps)
        validate_gamma(gamma_of(v), len(v.models), [t for t, _ in generation_pairs(v.t0, rs.n_gen_steps)])
        v.out = absolute(v.out) or v.out
    route = _route(rs.route, variants)
    clip, clip_weights, score_clip, score_clip_weights = _clips(cards[0], clip, clip_weights, score_clip,
                                                                 score_clip_weights)
    return RestyleConfig(base=absolute(base) or base, finetuned=[absolute(f) or f for f in finetuned],
                         variants=variants, n_inv_steps=rs.n_inv_steps,
                         n_gen_steps=rs.n_gen_steps, preset=preset, latents=absolute(latents) if latents else None,
                         resize_policy=rs.resize_policy, image_format=rs.image_format, batch_size=rs.batch_size,
                         trust_checkpoint=trust_checkpoint, root=absolute(out.rstrip("/")) or out, route=route,
                         clip=clip, clip_weights=clip_weights, score_clip=score_clip,
                         score_clip_weights=score_clip_weights, min_score=rs.min_score,
                         face_weights=absolute(face_weights) if face_weights else None, cards=cards)


def _clips(card: ModelCard, clip: str | None, clip_weights: str | None, score_clip: str | None,
           score_clip_weights: str | None) -> tuple[str | None, str | None, str | None, str | None]:
    """``(routing CLIP, its weights, scoring CLIP, its weights)``: the routing one as given, else the first
    model's (its card); the scoring one as given, else the routing one."""
    clip_weights = absolute(clip_weights) if clip_weights else card.clip_weights
    clip = clip or card.clip
    if score_clip:
        return clip, clip_weights, score_clip, absolute(score_clip_weights)
    return clip, clip_weights, clip, clip_weights


def _route(route: str, variants: list[Variant]) -> str:
    """The routing in force: ``auto`` is ``source`` when the variants have two or more different sources,
    else ``all``; ``source`` needs every variant to have one (:class:`ConfigError`)."""
    blind = [v.name for v in variants if not v.sources]
    if route == "source" and blind:
        raise ConfigError(f"--route source: {', '.join(blind)} has no source (no dclip.json with source and target); "
                          "restyle it with --route all")
    sources = {tuple(v.sources) for v in variants if v.sources}
    return route if route != "auto" else ("source" if len(sources) >= 2 else "all")


def _models(models: list[str] | None, mix: dict[str, Any] | None) -> tuple[list[str], Any]:
    """The fine-tuned model folders of a restyle and its mix (a :class:`~dclip_ray.mixing.MixSpec`; None
    without ``mix``)."""
    if mix is not None:
        if models:
            raise ConfigError("give either --model or --mix, not both (the mix file lists its models)")
        spec = mix_from_data(mix, "mix")  # one weight per model, summing to 1 at every step
        return list(spec.models), spec
    if not models:
        raise ConfigError("restyle needs --model FT_DIR (repeatable) or --mix MIX.yaml")
    names = [variant_name(m) for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"fine-tuned model folders must have distinct names, got {names}")
    return list(models), None


def _variants(out: str, finetuned: list[str], spec: Any, strength: float, cards: list[ModelCard],
              t0_of: Callable[[list[int]], int]) -> list[Variant]:
    """The outputs of a restyle (see :func:`build_restyle_config`): the mix ``spec``'s one, else one per
    fine-tuned model; ``t0_of(model indices)`` gives each its return step."""
    root = out.rstrip("/")
    if spec is not None:
        return [mix_variant(spec, f"{root}/mix", strength, cards, t0_of)]
    variants = []
    for i, (m, card) in enumerate(zip(finetuned, cards, strict=True), start=1):
        name = variant_name(m)
        gamma = {"type": "constant", "weights": [1.0 - strength, strength]}
        variants.append(Variant(name, f"{root}/{name}", [0, i], gamma, t0_of([0, i]),
                                {"model": m, "model_name": name, "strength": strength},
                                edits=card.edits, sources=[e[0] for e in card.edits]))
    return variants


def scaled_gamma(gamma: dict[str, Any], r: float) -> dict[str, Any]:
    """A gamma spec over ``[m_1..m_M]`` made one over ``[base, m_1..m_M]`` giving ``(1 - r) * eps_base + r * mix``
    (``r`` the edit strength in [0, 1])."""
    def w(ws: list[float]) -> list[float]:
        return [1.0 - r] + [r * float(x) for x in ws]

    if gamma.get("type") == "constant":
        return {**gamma, "weights": w(gamma["weights"])}
    if gamma.get("type") == "piecewise":
        return {**gamma, "table": {k: w(v) for k, v in gamma["table"].items()}}
    return {**gamma, "start": {**gamma["start"], "weights": w(gamma["start"]["weights"])},
            "end": {**gamma["end"], "weights": w(gamma["end"]["weights"])}}


def mix_variant(spec: Any, out: str, strength: float, cards: list[ModelCard],
                t0_of: Callable[[list[int]], int]) -> Variant:
    """The one output of a mix (:class:`~dclip_ray.mixing.MixSpec`) at edit ``strength`` r, for restyle and
    edit alike: the models' gamma-weighted mix (eq. 14), and at r < 1 the base weighted ``1 - r`` beside
    it; its edits are its models' ``cards``' (source, target); ``t0_of(model indices)``: its return step."""
    edits = [e for c in cards for e in c.edits]
    m = len(spec.models)
    if strength == 1.0:
        indices, gamma, meta = list(range(1, m + 1)), dict(spec.gamma), {"mix": spec.as_dict()}
    else:
        indices, gamma = list(range(m + 1)), scaled_gamma(dict(spec.gamma), strength)
        meta = {"mix": spec.as_dict(), "strength": strength}
    return Variant("mix", out, indices, gamma, t0_of(indices), meta, edits=edits,
                   sources=list(dict.fromkeys(e[0] for e in edits)))


def _t0_of(cards: list[ModelCard], t0: int | None, base: str | None, preset: str | None) -> int:
    """The one t0 rule (:func:`edit_t0`) for one variant's models: ``t0``, else their cards', else the
    base preset's, else 500."""
    named = next((n for n in (preset, base) if n and n in list_presets()), None)
    return edit_t0(t0, cards, get_preset(named) if named else None)


DECLARATION = "restyle.json"


def write_declaration(cfg: RestyleConfig, input_url: str) -> None:
    """Write ``ROOT/restyle.json``: the variants written under ROOT (name, folder relative to ROOT, the
    fine-tuned model folders it combines, absolute) and the input, so that ``verify`` checks every declared variant (a deleted variant folder is a problem).
    Variants another restyle of the same input declared there stay declared (two runs of other models
    into one ROOT)."""
    root = (cfg.root or cfg.variants[0].out).rstrip("/")
    variants = [{"name": v.name, "folder": posixpath.relpath(v.out, root) if not is_url(v.out)
                 else v.out[len(root):].strip("/") or ".",
                 "models": [redact(absolute(cfg.finetuned[i - 1])) for i in v.models if i > 0]} for v in cfg.variants]
    url = f"{root}/{DECLARATION}"
    old: bytes | None = None
    try:
        with fsspec.open(url, "rb") as f:
            old = f.read()
        before = json.loads(old)
        if before.get("input") == redact(input_url):
            mine = {v["folder"] for v in variants}
            variants = sorted([v for v in before.get("variants", []) if v.get("folder") not in mine] + variants,
                              key=lambda v: v["folder"])
    except (FileNotFoundError, OSError, ValueError, AttributeError):
        pass
    data = json.dumps({"format": "dclip-ray/restyle-run/1", "input": redact(input_url), "variants": variants},
                      indent=1, sort_keys=True).encode()
    if data != old:  # unchanged: a re-run touches nothing
        put_bytes(data, url)


def check_restyle(cfg: RestyleConfig, input_url: str) -> list[str]:
    """Validate a restyle before any work (the run, ``--dry-run`` and ``run --check`` call it): every
    output is a folder outside the input, the latent store and the models; the step settings fit the
    base model at every t0; the scoring CLIP is there (:func:`check_scoring`). Resolves ``cfg.latents``
    when it names one key's digest folder. Returns warnings (one line each); raises
    :class:`ConfigError` (exit 1)."""
    inputs: dict[str, str | None] = {"--input": input_url, "--latents": cfg.latents, "--base": cfg.base}
    inputs.update({f"--model {f}": f for f in cfg.finetuned})
    for folder in [cfg.root] * bool(cfg.root) + [v.out for v in cfg.variants]:
        check_out_folder(folder)
    if cfg.root:
        check_outputs({"--out": cfg.root}, inputs)
    check_outputs({f"--out ({v.name})": v.out for v in cfg.variants}, inputs)
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    for t0 in cfg.t0s():
        check_steps(base.schedule, t0, cfg.n_inv_steps, cfg.n_gen_steps, cfg.batch_size)
    check_base_model(base.sha256, cfg.base, dict(zip(cfg.finetuned, cfg.model_cards(), strict=True)))
    if cfg.clip and any(cfg.routes(v) for v in cfg.variants):  # the actors load it: check it here, before Ray
        from dclip_ray.models.clip import check_clip

        try:
            check_clip(cfg.clip, cfg.clip_weights, cfg.trust_checkpoint)
        except DclipError as e:
            raise type(e)(f"the CLIP that routes uncaptioned images (--clip {cfg.clip}): {e}") from None
    if cfg.latents:
        cfg.latents = store_root(cfg.latents)
    return check_scoring(cfg)


def check_scoring(cfg: RestyleConfig) -> list[str]:
    """Check that every edit can be scored before any work: with ``--min-score`` every variant must name
    its edits (source and target in its models' cards) and the scoring CLIP must be there (else
    :class:`ConfigError`, exit 1); without it a missing CLIP turns scoring off with a warning (returned)."""
    from dclip_ray.models.clip import check_clip

    if cfg.face_weights and not os.path.isfile(cfg.face_weights):
        raise ConfigError(f"--face-weights {cfg.face_weights}: no such local file (the identity score needs "
                          "facenet-pytorch's InceptionResnetV1 state dict, downloaded once)")
    blind = [v.name for v in cfg.variants if not v.edits]
    if cfg.min_score is not None and blind:
        raise ConfigError(f"--min-score {cfg.min_score:g}: {', '.join(blind)} has no source and target to score its "
                          "edits against (no dclip.json with source and target); drop --min-score")
    if cfg.score_clip is None:
        if cfg.min_score is not None:
            raise ConfigError(f"--min-score {cfg.min_score:g} needs a CLIP to score the edits: pass --score-clip NAME "
                              "(and --score-clip-weights PATH), or use models whose dclip.json names their CLIP")
        return [] if blind == [v.name for v in cfg.variants] else [
            "the edits are not scored: no CLIP is known (pass --score-clip NAME to score them)"]
    try:
        check_clip(cfg.score_clip, cfg.score_clip_weights, cfg.trust_checkpoint)
    except DclipError as e:
        if cfg.min_score is not None:
            raise type(e)(f"the CLIP that scores the edits for --min-score (--score-clip {cfg.score_clip}): {e}") from None
        name, cfg.score_clip, cfg.score_clip_weights = cfg.score_clip, None, None
        return [f"the edits are not scored: their CLIP {name} cannot be loaded ({e}); pass --score-clip NAME "
                "--score-clip-weights PATH to score them"]
    return []


__all__ = ["DECLARATION", "build_restyle_config", "check_restyle", "check_scoring", "latent_coverage",
           "latents_current", "mix_variant", "restyle_plan", "scaled_gamma", "variant_name", "write_declaration"]
