"""Precompute, one input shard -> latents (no Ray): DDIM-invert every good image with the ORIGINAL model
and store the latents (:mod:`dclip_ray.io.latents`), committed with a marker; a committed shard from the
same input content is skipped. :mod:`dclip_ray.pipeline.precompute` schedules it, one Ray task per shard.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from dclip_ray.config import PrecomputeConfig, Resources
from dclip_ray.diffusion import generate, invert
from dclip_ray.errors import ConfigError
from dclip_ray.io.latents import LatentKey, LatentStore
from dclip_ray.io.leases import LeaseKeeper
from dclip_ray.io.locations import check_outputs
from dclip_ray.io.sources import STAT_PREFIX, content_fingerprint, duplicate_reason, shard_stat
from dclip_ray.models import eps_fn_of
from dclip_ray.models.base import BaseModel
from dclip_ray.models.cache import cached_base
from dclip_ray.urls import redact

from .checks import check_out_folder, check_steps
from .common import (
    CountingEps,
    PrecomputeResult,
    await_leased,
    lease_text,
    psnr,
    took_over_warnings,
    unreadable_shards,
)
from .inputs import batched, decode_shard, image_sha256, io_threads, parallel_map

log = logging.getLogger(__name__)


def skipped_result(shard: str, marker: dict) -> PrecomputeResult:
    """The result of a shard already committed, from its latent marker (``n`` ok keys, ``errors``)."""
    errors = marker.get("errors") or {}
    return PrecomputeResult(shard, skipped=True, n=marker.get("n", 0) + len(errors), n_ok=marker.get("n", 0),
                            n_error=len(errors), errors=errors, truncated=marker.get("truncated"))


def precompute_shard(
    model: str,
    preset: str | None,
    shard: str,
    path: str,
    store_root: str,
    key: LatentKey,
    batch_size: int = 16,
    recon_psnr: bool = False,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    fingerprint: str | None = None,
    owner: str | None = None,
) -> PrecomputeResult:
    """DDIM-invert every good image of one input shard with the ORIGINAL model and store the latents.

    Skips a shard already committed under ``key`` from the same input content (``fingerprint``, see
    :func:`dclip_ray.io.sources.shard_fingerprint`; computed here when None or a driver's stat print:
    the driver reads no input byte); a shard whose input was
    rewritten since is redone. A key naming several samples of the shard is an error (none of its
    samples is inverted). ``owner`` (a run id) takes the shard's lease first: a shard leased by another
    live run is left to it (``leased`` names the holder).
    """
    store = LatentStore(store_root, key)
    source_stat = shard_stat(path)  # before the content is read: a later change shows as a new stat
    fingerprint = content_fingerprint(path, fingerprint)
    if store.is_current(shard, fingerprint):
        return skipped_result(shard, store.read_marker(shard) or {})
    keeper = LeaseKeeper(store.dir, shard, owner) if owner is not None else None
    with keeper or nullcontext() as held:
        if held is not None:
            return PrecomputeResult(shard, leased=lease_text(held))
        base = cached_base(model, preset, device, trust_checkpoint)
        _check_key(model, base, key)
        result = _invert_shard(base, shard, path, store, batch_size, recon_psnr, device, fingerprint, source_stat)
    if keeper is not None and keeper.notes:
        result.took_over = "; ".join(keeper.notes)
    return result


def _check_key(model: str, base: BaseModel, key: LatentKey) -> None:
    if base.sha256 != key.base_sha256:
        raise ConfigError(f"model {model} has sha256 {base.sha256[:12]}..., the latent key says {key.base_sha256[:12]}...")
    if base.resolution != key.resolution:
        raise ConfigError(f"model {model} works at {base.resolution}px, the latent key says {key.resolution}px")


@dataclass
class _Inverted:
    """The latents of one shard so far: ``latents`` [N,3,H,W] for ``keys``, PSNRs [N] when measured."""

    keys: list[str] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    psnrs: list[torch.Tensor] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    shas: dict[str, str] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)


def _invert_all(base: BaseModel, eps: CountingEps, path: str, key: LatentKey, batch_size: int, recon_psnr: bool,
                device: str, status: dict) -> _Inverted:
    """Invert the shard's good images in batches; the first sample of each key only."""
    acc = _Inverted()
    for batch in batched(iter(decode_shard(path, key.resolution, key.resize_policy, status)), batch_size):
        good = []
        for d in batch:
            acc.seen[d.rec.key] = acc.seen.get(d.rec.key, 0) + 1
            if acc.seen[d.rec.key] > 1:
                continue
            if d.error is not None:
                acc.errors[d.rec.key] = d.error
            else:
                good.append(d)
        if not good:
            continue
        x0 = torch.stack([d.x for d in good]).to(device)
        with torch.no_grad():
            x_t0 = invert(eps, x0, key.t0, key.n_inv_steps, base.schedule)
            if recon_psnr:
                acc.psnrs.append(psnr(generate(eps, x_t0, key.t0, key.n_inv_steps, base.schedule), x0).cpu())
        acc.keys.extend(d.rec.key for d in good)
        acc.shas.update((d.rec.key, image_sha256(d.rec)) for d in good)
        acc.latents.append(x_t0.cpu())
    return acc


def _invert_shard(base: BaseModel, shard: str, path: str, store: LatentStore, batch_size: int, recon_psnr: bool,
                  device: str, fingerprint: str, source_stat: str | None = None) -> PrecomputeResult:
    key = store.key
    start = time.perf_counter()
    eps = CountingEps(eps_fn_of(base.unet))
    status: dict = {}
    acc = _invert_all(base, eps, path, key, batch_size, recon_psnr, device, status)
    keys, errors = acc.keys, acc.errors
    latents = torch.cat(acc.latents) if acc.latents else torch.zeros(0, 3, key.resolution, key.resolution)
    recon = torch.cat(acc.psnrs) if acc.psnrs else None
    dups = {k: n for k, n in acc.seen.items() if n > 1}
    if dups:  # no sample of a duplicated key is used
        keep = [i for i, k in enumerate(keys) if k not in dups]
        keys, latents = [keys[i] for i in keep], latents[keep]
        recon = recon[keep] if recon is not None else None
        for k, n in dups.items():
            errors[k] = duplicate_reason(k, n)
            acc.shas.pop(k, None)
    truncated = status.get("truncated")
    if truncated:  # keys that cannot be read: an error of the shard, never "done" (the next run tries again)
        return PrecomputeResult(shard, n=len(keys) + len(errors), truncated=truncated, unet_evals=eps.evals,
                                seconds=round(time.perf_counter() - start, 3))
    store.write(shard, keys, latents, recon, errors, source=redact(path), extra={"truncated": truncated, "source_stat": source_stat},
                image_sha256=acc.shas, source_fingerprint=fingerprint)
    return PrecomputeResult(shard, n=len(keys) + len(errors), n_ok=len(keys), n_error=len(errors), errors=errors,
                            unet_evals=eps.evals, seconds=round(time.perf_counter() - start, 3), truncated=truncated,
                            mean_recon_psnr=float(recon.mean()) if recon is not None else None)


@dataclass
class PrecomputeJob:
    """Arguments of `dclip-ray precompute` (see its --help): where, the :class:`PrecomputeConfig` (how),
    the :class:`Resources` (``cpus_per_task``/``gpus_per_task``) and which Ray."""

    model: str
    input: str
    out: str
    config: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    resources: Resources = field(default_factory=Resources)
    preset: str | None = None
    address: str | None = None
    num_cpus: int | None = None
    verbose: bool = False
    trust_checkpoint: bool = False


def latent_key(job: PrecomputeJob) -> LatentKey:
    """The key of this job's latents (loads the base model once in the driver to hash it)."""
    base = cached_base(job.model, job.preset, trust_checkpoint=job.trust_checkpoint)
    c = job.config
    return LatentKey(base.sha256, c.t0, c.n_inv_steps, base.resolution, c.resize_policy, c.dtype)  # type: ignore[arg-type]


def check_job(job: PrecomputeJob) -> None:
    """Validate every argument before work starts (also what ``--dry-run``-style checks run): the store
    is a folder outside the input and the model, the step settings fit the model. Raises
    :class:`ConfigError` (exit 1). The settings themselves were checked when the config was made."""
    check_out_folder(job.out)
    check_outputs({"--out": job.out}, {"--input": job.input, "--model": job.model})
    base = cached_base(job.model, job.preset, trust_checkpoint=job.trust_checkpoint)
    check_steps(base.schedule, job.config.t0, n_inv_steps=job.config.n_inv_steps, batch_size=job.config.batch_size)


def split_current(store: LatentStore, shards: list[tuple[str, str]], prints: dict[str, str],
                  ) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """``(the shards to invert, a skipped row for each shard whose latents are current)``; the markers are
    read in threads on an object store. A shard whose input changed since its latents were made is
    logged (its worker compares the content and inverts it again if it differs)."""
    markers = parallel_map(lambda s: store.read_marker(s[0]), shards, io_threads(store.dir))
    current = [store.current_marker(m, prints[n]) for (n, _), m in zip(shards, markers, strict=True)]
    rows = []
    for (n, _), marker, c in zip(shards, markers, current, strict=True):
        if c:
            rows.append(skipped_result(n, marker).as_dict())
        elif marker is not None and marker.get("key") == store.key.fields() and (
                marker.get("source_stat") or not prints[n].startswith(STAT_PREFIX)):  # else: a marker made before stats
            log.warning("input shard %s changed since its latents were computed (%s): %s", n,
                        "its size or modification time" if prints[n].startswith(STAT_PREFIX) else "its content",
                        "the worker compares its content and inverts it again if it differs")
    return [s for s, c in zip(shards, current, strict=True) if not c], rows


def precompute_summary(store: LatentStore, results: list[dict[str, Any]], prints: dict[str, str]) -> dict[str, Any]:
    """The run's summary from every shard's row (shards leased by another run waited for first):
    ``{"store", "key", "shards", "n_images", "n_errors", "errors", "n_skipped", "leased", "unreadable",
    "warnings"}``."""
    results = sorted(results, key=lambda r: r["shard"])
    leased = {r["shard"]: r["leased"] for r in results if r.get("leased")}
    if leased:  # another run is inverting them: wait for it, as this run would have done the work itself
        left = await_leased(leased, store.dir, lambda s: store.is_current(s, prints[s]))
        results = [skipped_result(r["shard"], store.read_marker(r["shard"]) or {}).as_dict()
                   if r["shard"] in leased and r["shard"] not in left else r for r in results]
        leased = left
    errors = {k: v for r in results for k, v in (r.get("errors") or {}).items()}  # committed shards' too
    return {"store": redact(store.dir), "key": store.key.fields(), "shards": results,
            "n_images": sum(r.get("n_ok", 0) for r in results if not r.get("skipped")),
            "n_errors": len(errors), "errors": errors, "n_skipped": sum(1 for r in results if r.get("skipped")),
            "leased": leased, "unreadable": unreadable_shards(results), "warnings": took_over_warnings(results)}
