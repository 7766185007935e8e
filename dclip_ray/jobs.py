"""Single-machine jobs behind `dclip-ray finetune` and `latent-optim` (no Ray; `edit` is restyle on one
machine: :mod:`dclip_ray.stages.edit`).

Each job loads its models once, reads images from a folder or shards (local or fsspec), and returns a
JSON-serialisable summary. Images that cannot be decoded are listed in the summary's ``errors`` with
their reason (never dropped silently).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dclip_ray.config import QualityCheck
from dclip_ray.cpu import lowered_threads_warning, use_free_cores
from dclip_ray.edit import invert_images, latent_optimization
from dclip_ray.errors import InputFileError
from dclip_ray.evaluation.report import save_grid
from dclip_ray.finetune import FinetuneConfig, finetune, save_finetuned
from dclip_ray.io.images import ImageError, encode_png, load_image_tensor
from dclip_ray.io.locations import check_outputs
from dclip_ray.io.sources import duplicate_reason, iter_records
from dclip_ray.losses import Augment
from dclip_ray.models import eps_fn_of, load_face
from dclip_ray.models.base import load_base, resolve_clip
from dclip_ray.quality import (
    DIVERGED,
    assess,
    check_model,
    failed_path,
    split_check,
    status_of,
    weights_finite,
)
from dclip_ray.urls import abs_location, redact

log = logging.getLogger(__name__)


@dataclass
class ImageBatch:
    """Decoded input images: ``x`` [N,3,size,size] in [-1,1] for ``keys`` (read from ``shards``), and an
    ``{"key", "shard", "error"}`` entry for every key that could not be used."""

    keys: list[str]
    shards: list[str]
    x: torch.Tensor
    errors: list[dict]


def read_image_batch(url: str, size: int, limit: int | None = None) -> ImageBatch:
    """Decode up to ``limit`` good images of ``url`` (every one when ``limit`` is None).

    A key that names several samples of the input (two shards with the same keys, or ``a.png`` and
    ``a.jpg`` in one folder) is one error entry and none of its samples is used: which one is the real
    image cannot be told, and both would be written to the same ``{key}.png``. With ``limit``, keys are
    checked against the records read so far. Raises :class:`InputFileError` when no image is usable.
    """
    good: dict[str, tuple[str, torch.Tensor]] = {}
    bad: dict[str, dict] = {}
    shards_of: dict[str, list[str]] = {}
    for rec in iter_records(url):
        if limit is not None and len(good) >= limit:
            break
        shards = shards_of.setdefault(rec.key, [])
        shards.append(rec.shard)
        if len(shards) > 1:
            good.pop(rec.key, None)
            reason = duplicate_reason(rec.key, len(shards), "the input")
            bad[rec.key] = {"key": rec.key, "shard": ", ".join(dict.fromkeys(shards)), "error": reason}
            log.warning("skipping %s: %s", rec.key, reason)
            continue
        if rec.error is None:
            try:
                good[rec.key] = (rec.shard, load_image_tensor(rec.image or b"", size))
                continue
            except ImageError as e:
                rec.error = str(e)
        bad[rec.key] = {"key": rec.key, "shard": rec.shard, "error": rec.error}
        log.warning("skipping %s: %s", rec.key, rec.error)
    if not good:
        raise InputFileError(f"{url}: no usable image ({len(bad)} errors); check the --images input")
    return ImageBatch(list(good), [sh for sh, _ in good.values()], torch.stack([x for _, x in good.values()]),
                      list(bad.values()))


def read_images(url: str, size: int, limit: int | None = None) -> tuple[list[str], torch.Tensor, list[dict]]:
    """Decode up to ``limit`` good images of ``url`` to ``[N,3,size,size]`` in [-1,1].

    Returns ``(keys, images, errors)``; ``errors`` lists ``{"key", "shard", "error"}`` for the rest
    (duplicate keys included, see :func:`read_image_batch`).
    """
    b = read_image_batch(url, size, limit)
    return b.keys, b.x, b.errors


@dataclass
class FinetuneJob:
    """Arguments of `dclip-ray finetune` (see its --help); the prompt pair is ``train.source/target``."""

    model: str
    images: str
    out: str
    train: FinetuneConfig
    preset: str | None = None
    clip: str | None = None
    clip_weights: str | None = None
    face_weights: str | None = None
    checkpoint_dir: str | None = None
    tensorboard_dir: str | None = None
    card: dict[str, Any] | None = None  # more for the model card (e.g. the search that chose the settings)
    check: QualityCheck = field(default_factory=QualityCheck)  # the held-aside check before the prompt is done


def card_extra(job: FinetuneJob, clip: Any, keys: list[str]) -> dict[str, Any]:
    """The card fields `finetune` adds to the config (:func:`~dclip_ray.finetune.save_finetuned`)."""
    weights = job.clip_weights
    return {"train_keys": keys, "base_model": redact(job.model), "clip": clip.name,
            "clip_weights": redact(abs_location(weights)) if weights else None,
            **(job.card or {})}


def run_finetune(job: FinetuneJob, progress: bool = True) -> dict[str, Any]:
    """Invert ``job.train.n_train`` images with the original model, fine-tune, check the model on the next
    ``job.check.check_images`` images (:mod:`dclip_ray.quality`), save it to ``job.out`` (to
    ``job.out + ".failed"`` when it fails the check, unless accepted); return a summary whose ``status`` is
    "ok", "ok (low quality, accepted)" or "failed (quality)" and whose ``quality`` holds the check."""
    check_outputs({"--out": job.out, "--out (a model that fails its check)": failed_path(job.out),
                   "--checkpoint-dir": job.checkpoint_dir, "--tensorboard": job.tensorboard_dir},
                  {"--images": job.images, "--model": job.model, "--clip-weights": job.clip_weights,
                   "--face-weights": job.face_weights})
    threads = torch.get_num_threads(), use_free_cores()
    base = load_base(job.model, job.preset)
    clip = resolve_clip(job.clip, job.clip_weights, base)
    face = load_face(job.face_weights) if job.train.w_id > 0 else None
    cfg = job.train
    keys, x, errors = read_images(job.images, base.resolution, cfg.n_train + job.check.check_images)
    x0, x_check, held = split_check(x, cfg.n_train, job.check.check_images)
    keys = keys[:cfg.n_train]
    latents = invert_images(eps_fn_of(base.unet), x0, cfg.t0, cfg.n_inv_steps, base.schedule, disable=not progress)
    result = finetune(base.unet, clip, x0, latents, base.schedule, cfg, face=face,
                      checkpoint_dir=job.checkpoint_dir, disable=not progress, tensorboard_dir=job.tensorboard_dir)
    warnings: list[str] = [w for w in [lowered_threads_warning(*threads)] if w]
    finite = weights_finite(result.unet) and math.isfinite(result.final_loss)
    measured = None if finite else DIVERGED  # --check-images 0 checks nothing but divergence
    if job.check.check_images:
        measured = check_model(eps_fn_of(base.unet), eps_fn_of(result.unet), clip, x_check, cfg, base.schedule,
                               held, finite, latents=None if held else latents[:len(x_check)])
        if not held:
            warnings.append(f"{job.images} has no image beyond the {cfg.n_train} trained on: the check edited "
                            "training images (add images to hold some aside)")
    quality = assess(measured, job.check, base.preset)
    status = status_of(quality)
    where = failed_path(job.out) if status == "failed (quality)" else job.out
    out = save_finetuned(result, where, cfg, base.unet, base.schedule_config,
                         extra={**card_extra(job, clip, keys), **({"quality": quality} if quality else {})})
    return {"status": status, "model_path": str(out), "source": cfg.source, "target": cfg.target,
            "n_train": len(keys), "final_loss": result.final_loss, "seconds": round(result.seconds, 2),
            "quality": quality, "warnings": warnings, "errors": errors, "config": asdict(cfg)}


@dataclass
class LatentOptimJob:
    """Arguments of `dclip-ray latent-optim` (see its --help)."""

    model: str
    source: str
    target: str
    images: str
    out: str
    preset: str | None = None
    clip: str | None = None
    clip_weights: str | None = None
    t0: int | None = None
    n_inv_steps: int = 40
    n_gen_steps: int = 6
    iterations: int = 30
    lr: float = 0.02
    w_l1: float = 1.0
    limit: int | None = 8
    seed: int = 0
    grid: bool = False


def run_latent_optim(job: LatentOptimJob, progress: bool = True) -> dict[str, Any]:
    """The latent-optimisation baseline: optimise each image's x_t0 through the frozen model."""
    check_outputs({"--out": job.out}, {"--images": job.images, "--model": job.model, "--clip-weights": job.clip_weights})
    use_free_cores()
    base = load_base(job.model, job.preset)
    clip = resolve_clip(job.clip, job.clip_weights, base)
    t0 = job.t0 or (base.preset.t0 if base.preset else 500)
    keys, x0, errors = read_images(job.images, base.resolution, job.limit)
    eps = eps_fn_of(base.unet)
    for p in base.unet.parameters():
        p.requires_grad_(False)
    lat = invert_images(eps, x0, t0, job.n_inv_steps, base.schedule, disable=not progress)
    res = latent_optimization(eps, clip, x0, lat, job.source, job.target, base.schedule, t0, job.n_gen_steps,
                              job.iterations, job.lr, w_l1=job.w_l1, augment=Augment(), seed=job.seed)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    for key, x in zip(keys, res.images, strict=True):
        (out / f"{key}.png").write_bytes(encode_png(x))
    summary: dict[str, Any] = {"out": str(out), "n_edited": len(keys), "t0": t0, "final_loss": res.losses[-1],
                               "errors": errors}
    if job.grid:
        summary["grid"] = str(save_grid([x0[:16], res.images[:16]], out / "grid.png"))
    return summary
