"""What a restyle would find and do, without doing it (no Ray): what the latent store covers
(:func:`latent_coverage`, :func:`latents_current`) and the ``--dry-run`` plan (:func:`restyle_plan`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dclip_ray.errors import ConfigError
from dclip_ray.io.latents import LatentKey, find_latent_store, key_mismatch, stored_keys
from dclip_ray.io.sources import STAT_PREFIX, shard_fingerprint
from dclip_ray.models.cache import cached_base
from dclip_ray.urls import redact

from .inputs import shard_keys
from .variants import RestyleConfig, gen_evals_per_image, model_shas, shard_committed, shard_done


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
