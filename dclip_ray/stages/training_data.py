"""Fine-tuning data (no Ray): the first ``n_train`` good images (or the chosen ``keys``, see
:mod:`dclip_ray.stages.selection`) and their latents at ``t0``, from the latent store when it has them,
else inverted here with the original model."""

from __future__ import annotations

import torch

from dclip_ray.diffusion import invert
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.io.latents import LatentStore, find_latent_store
from dclip_ray.models import eps_fn_of
from dclip_ray.models.base import BaseModel

from .inputs import decode_shard, image_sha256, input_shards


def training_data(
    base: BaseModel,
    n_train: int,
    t0: int,
    n_inv_steps: int,
    images: str | None = None,
    latents_root: str | None = None,
    policy: str = "center-crop",
    keys: list[str] | None = None,
) -> tuple[list[str], torch.Tensor, torch.Tensor, str]:
    """The first ``n_train`` good images (among ``keys`` when given: the images chosen for the prompt)
    and their latents for fine-tuning at ``t0``.

    Cached latents (``latents_root``, matched by the full key) are used when present, with the
    images re-read from the shard each latent came from (or ``images``); otherwise the images of
    ``images`` are inverted here. Returns ``(keys, x0 [N,3,H,W] in [-1,1], latents [N,3,H,W], origin)``
    where origin is ``"cache"`` or ``"inverted"``.
    """
    store = find_latent_store(latents_root, base.sha256, t0, n_inv_steps, base.resolution, policy) if latents_root else None
    if store is not None:
        got, xs, zs = _from_cache(store, base, n_train, images, policy, keys)
        short = keys is not None and len(got) < min(n_train, len(keys))
        if short and images is None:
            raise ConfigError(f"the latent store {latents_root} holds current latents at t0={t0} for {len(got)} of the "
                              f"{min(n_train, len(keys))} images chosen for this prompt; run `dclip-ray precompute "
                              f"--t0 {t0}` on the whole input, or pass --images")
        if got and not short:
            return got, torch.stack(xs), torch.stack(zs), "cache"
    if images is None:
        raise ConfigError(
            f"no cached latents for t0={t0}, n_inv={n_inv_steps} under {latents_root}; run `dclip-ray precompute` "
            "with those settings or pass --images"
        )
    got, xs = _first_images(images, base.resolution, n_train, policy, keys)
    x0 = torch.stack(xs)
    with torch.no_grad():
        lat = invert(eps_fn_of(base.unet), x0, t0, n_inv_steps, base.schedule)
    return got, x0, lat, "inverted"


def _from_cache(store: LatentStore, base: BaseModel, n_train: int, images: str | None, policy: str,
                only: list[str] | None = None) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Up to ``n_train`` (key, image, cached latent) whose latent is fresh for the image read now (keys
    among ``only`` when given)."""
    allowed = None if only is None else set(only)
    keys: list[str] = []
    xs: list[torch.Tensor] = []
    zs: list[torch.Tensor] = []
    for shard in store.committed_shards():
        cached = store.read(shard)
        wanted = dict(zip(cached.keys, range(len(cached.keys)), strict=True))
        src = cached.source
        if images is not None:
            matches = [p for n, p in input_shards(images) if n == shard]
            src = matches[0] if matches else None
        if src is None:
            continue
        for d in decode_shard(src, base.resolution, policy):
            if allowed is not None and d.rec.key not in allowed:
                continue
            if d.x is not None and d.rec.key in wanted and cached.is_fresh(d.rec.key, image_sha256(d.rec)):
                keys.append(d.rec.key)
                xs.append(d.x)
                zs.append(cached.latents[wanted[d.rec.key]].float())
                if len(keys) >= n_train:
                    return keys, xs, zs
    return keys, xs, zs


def _first_images(images: str, size: int, n_train: int, policy: str, only: list[str] | None = None,
                  ) -> tuple[list[str], list[torch.Tensor]]:
    """The first ``n_train`` good images of ``images`` (keys among ``only`` when given); raises
    :class:`InputFileError` when there is none."""
    allowed = None if only is None else set(only)
    keys: list[str] = []
    xs: list[torch.Tensor] = []
    for _, path in input_shards(images):
        for d in decode_shard(path, size, policy):
            if d.x is not None and (allowed is None or d.rec.key in allowed):
                keys.append(d.rec.key)
                xs.append(d.x)
            if len(keys) >= n_train:
                break
        if len(keys) >= n_train:
            break
    if not keys:
        raise InputFileError(f"{images}: no usable image; check the --images input")
    return keys, xs
