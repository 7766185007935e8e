"""Restyle configuration (no Ray): options -> :class:`RestyleConfig`, the checks a restyle runs before any
work, what the latent store covers, the ``--dry-run`` plan, and the run's declaration (``restyle.json``).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import fsspec

from dclip_ray.config import RestyleSettings
from dclip_ray.diffusion import generation_pairs
from dclip_ray.errors import ConfigError, DclipError
from dclip_ray.io.latents import LatentKey, key_mismatch, store_root, stored_keys
from dclip_ray.io.locations import check_outputs
from dclip_ray.io.shards import put_bytes
from dclip_ray.io.sources import STAT_PREFIX, shard_fingerprint
from dclip_ray.mixing import mix_from_data, validate_gamma
from dclip_ray.models.base import check_base_model, edit_t0
from dclip_ray.models.cache import cached_base
from dclip_ray.models.card import ModelCard, read_card
from dclip_ray.models.presets import get_preset, list_presets
from dclip_ray.urls import is_url, redact

from .checks import check_out_folder, check_step_counts, check_steps
from .inputs import absolute, shard_keys
from .precompute import find_latent_store
from .restyle import (
    RestyleConfig,
    Variant,
    gamma_of,
    gen_evals_per_image,
    model_shas,
    shard_committed,
    shard_done,
)


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
    """Turn the restyle options into a :class:`RestyleConfig`.

    One output folder per variant, ``out/{name}``, whatever their number: ``models`` (fine-tuned
    folders) give one variant each, named after the folder, sharing one inversion per image and t0;
    ``mix`` (``{"models": [...], "gamma": spec}``, eq. 14) gives the one variant ``out/mix``.
    ``settings``: the :class:`RestyleSettings` (or give its fields as keywords, e.g. ``n_gen_steps=20``:
    checked by the same declared rules). Strength r mixes each fine-tuned model with the base:
    ``(1 - r) * eps_base + r * eps_ft``. ``base`` defaults to the ``base_model`` in the cards; each
    variant's t0 to its models' (:func:`_t0_of`). ``route`` auto becomes ``source`` when the variants
    have two or more different sources. ``clip``/``clip_weights``: the CLIP that routes uncaptioned
    images (default: the one the models were trained with, from their cards); ``score_clip``/
    ``score_clip_weights``: the CLIP that scores every edit (default: the routing one); ``face_weights``:
    a face identity network whose cosine before/after joins the scores (faces).
    """
    if settings is None:
        settings = RestyleSettings(**given)
    elif given:
        raise TypeError(f"give either settings or its fields, not both ({sorted(given)})")
    rs = settings
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
    sources = {tuple(v.sources) for v in variants if v.sources}
    route = rs.route if rs.route != "auto" else ("source" if len(sources) >= 2 else "all")
    blind = [v.name for v in variants if not v.sources]
    if rs.route == "source" and blind:
        raise ConfigError(f"--route source: {', '.join(blind)} has no source (no dclip.json with source and target); "
                          "restyle it with --route all")
    clip_weights = absolute(clip_weights) if clip_weights else cards[0].clip_weights
    clip = clip or cards[0].clip
    score_clip, score_clip_weights = ((score_clip, absolute(score_clip_weights)) if score_clip
                                      else (clip, clip_weights))
    return RestyleConfig(base=absolute(base) or base, finetuned=[absolute(f) or f for f in finetuned],
                         variants=variants, n_inv_steps=rs.n_inv_steps,
                         n_gen_steps=rs.n_gen_steps, preset=preset, latents=absolute(latents) if latents else None,
                         resize_policy=rs.resize_policy, image_format=rs.image_format, batch_size=rs.batch_size,
                         trust_checkpoint=trust_checkpoint, root=absolute(out.rstrip("/")) or out, route=route,
                         clip=clip, clip_weights=clip_weights, score_clip=score_clip,
                         score_clip_weights=score_clip_weights, min_score=rs.min_score,
                         face_weights=absolute(face_weights) if face_weights else None, cards=cards)


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


def latent_coverage(cfg: RestyleConfig, shards: list[tuple[str, str]], prints: dict[str, str],
                    require: bool = False) -> list[str]:
    """What ``--latents`` gives this restyle, per t0: warnings (one line each) when it gives nothing or
    not every shard, naming the key field that differs. With ``require`` (``--require-latents``) a
    shard without current latents is a :class:`ConfigError` instead (exit 1, nothing started)."""
    if not cfg.latents:
        if require:
            raise ConfigError("--require-latents needs --latents STORE (the root that `dclip-ray precompute --out` wrote)")
        return []
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    out = []
    for t0 in cfg.t0s():
        at = f" at t0={t0}" if len(cfg.t0s()) > 1 else ""
        key = LatentKey(base.sha256, t0, cfg.n_inv_steps, base.resolution, cfg.resize_policy)  # type: ignore[arg-type]
        store = find_latent_store(cfg.latents, base.sha256, t0, cfg.n_inv_steps, base.resolution, cfg.resize_policy)
        if store is None:
            stored = stored_keys(cfg.latents)
            if stored:
                diffs = "; ".join(", ".join(key_mismatch(key, k)) or "dtype only" for k in stored[:3])
                why = f"it holds latents of another key: {diffs}"
            else:
                why = "it holds no committed latents (run `dclip-ray precompute` with this run's settings)"
            msg = (f"--latents {redact(cfg.latents)}: no cached latent matches this run{at}, every image is inverted; "
                   f"{why}")
            if require:
                raise ConfigError(msg + "; match --t0/--n-inv/--resize-policy to the store, or drop --require-latents")
            out.append(msg)
            continue
        missing = [n for n, p in shards if not latents_current(store, n, p, prints[n])]
        if missing:
            msg = (f"--latents {redact(cfg.latents)}: {len(missing)} of {len(shards)} input shard(s) have no current "
                   f"latents{at} (not precomputed, or the input changed since), e.g. {missing[:3]}; they are inverted here")
            if require:
                raise ConfigError(msg.replace("; they are inverted here", "; run `dclip-ray precompute` on this input first"))
            out.append(msg)
    return out


def restyle_plan(cfg: RestyleConfig, shards: list[tuple[str, str]], prints: dict[str, str] | None = None,
                 ) -> dict[str, Any]:
    """What a restyle would run (``--dry-run``): per shard the keys, whether it is committed, how many
    latents are cached (per t0); totals of images and UNet evaluations (images x network calls: one
    inversion per image and distinct t0 unless cached, plus each variant's generation). With routing the
    generation count is an upper bound (every image counted for every variant). Loads the models (to
    hash them) but runs none."""
    shas = model_shas(cfg)
    hashes = [cfg.variant_hash(v, shas) for v in cfg.variants]
    base = cached_base(cfg.base, cfg.preset, cfg.device, cfg.trust_checkpoint)
    stores = {t0: (find_latent_store(cfg.latents, shas[0], t0, cfg.n_inv_steps, base.resolution, cfg.resize_policy)
                   if cfg.latents else None) for t0 in cfg.t0s()}
    per_gen = sum(gen_evals_per_image(v, v.t0, cfg.n_gen_steps) for v in cfg.variants)
    rows, total_imgs, total_evals = [], 0, 0
    for name, path in shards:
        keys, truncated = shard_keys(path)
        fp = (prints or {}).get(name)
        done = shard_committed(cfg, hashes, name, fp)
        resort = done and not shard_done(cfg, hashes, name, fp)  # only --min-score changed: no generation
        cached = {t0: _n_cached(store, name, path, fp, keys) for t0, store in stores.items()}
        inv = sum((len(keys) - n) * (cfg.n_inv_steps - 1) for n in cached.values())
        evals = 0 if done else inv + len(keys) * per_gen
        rows.append({"shard": name, "path": redact(path), "images": len(keys), "cached_latents": sum(cached.values()),
                     "cached_latents_per_t0": cached, "committed": done, "rethreshold": resort, "unet_evals": evals, "truncated": truncated})
        if not done:
            total_imgs += len(keys)
            total_evals += evals
    return {"shards": rows, "images": total_imgs, "unet_evals": total_evals,
            "variants": [asdict(v) for v in cfg.variants], "t0s": cfg.t0s(), "route": cfg.route,
            "n_inv_steps": cfg.n_inv_steps, "n_gen_steps": cfg.n_gen_steps}


def latents_current(store: Any, name: str, path: str, fp: str) -> bool:
    """Whether ``store`` holds current latents of input shard ``name`` (at ``path``, planned with print
    ``fp``): by size and time for a stat print, and when those differ (a touched input, or a store
    written before stats were recorded) by the content, read for that shard only."""
    if store.is_current(name, fp):
        return True
    return fp.startswith(STAT_PREFIX) and store.is_committed(name) and store.is_current(name, shard_fingerprint(path))


def _n_cached(store: Any, name: str, path: str, fp: str | None, keys: list[str]) -> int:
    """How many of a shard's ``keys`` have current latents in ``store`` (latents of an older input are
    not used)."""
    if store is None:
        return 0
    current = latents_current(store, name, path, fp) if fp is not None else store.is_committed(name)
    marker = store.read_marker(name) if current else None
    return len(set(keys) & set((marker or {}).get("keys") or []))
