"""The paper's novel applications (sec. 3.2, Fig. 4): unseen-domain translation and stroke-conditioned
generation.

Both are one procedure over eps functions (see :mod:`dclip_ray.diffusion`):

1. *into the trained domain*: forward-noise the input stochastically to ``t0`` (eq. 1,
   ``x_t0 = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) w``) and DDIM-generate back to an image with the
   ORIGINAL model; repeat ``k`` times (the official code repeats the noise + denoise round trip), each
   round starting from the previous round's image. An image from an unseen domain (a sketch, a
   colour-block painting) comes back as an image of the domain the model was trained on;
2. *edit*: DDIM-invert that image with the original model to ``t0_edit`` and generate with the
   fine-tuned model (or with the original one when none is given, which reconstructs step 1's image).

The noise ``w`` of round ``i`` for image ``j`` depends only on ``(seed, i, j)``, never on the batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dclip_ray.config import TranslateSettings
from dclip_ray.cpu import use_free_cores
from dclip_ray.diffusion import EpsFn, Schedule, add_noise, generate
from dclip_ray.edit import generate_images, invert_images
from dclip_ray.errors import ConfigError
from dclip_ray.evaluation.report import RUN_FILE, save_grid
from dclip_ray.io.images import encode_png
from dclip_ray.io.locations import check_outputs
from dclip_ray.jobs import read_images
from dclip_ray.mixing import strength_eps_fn
from dclip_ray.models import eps_fn_of, load_unet
from dclip_ray.models.base import check_base_model, edit_t0, load_base
from dclip_ray.models.card import read_card
from dclip_ray.urls import abs_location

log = logging.getLogger(__name__)



def _derived_seed(*parts: int) -> int:
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _noise(shape: tuple[int, ...], seed: int, round_index: int, index: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(_derived_seed(seed, round_index, index)))


@torch.no_grad()
def to_trained_domain(
    eps_fn: EpsFn,
    x0: torch.Tensor,
    t0: int,
    n_gen_steps: int,
    schedule: Schedule,
    k: int = 1,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 16,
    disable: bool = True,
) -> torch.Tensor:
    """Stochastic noising to ``t0`` (eq. 1) then DDIM generation with ``eps_fn``, repeated ``k`` times.

    ``x0``: [N,3,H,W] in [-1,1] from any domain; returns [N,3,H,W] (~[-1,1]) in the domain of
    ``eps_fn``'s model. ``n_gen_steps`` network calls per round and image; ``eta > 0`` makes the
    generation stochastic too (seeded by ``seed``). Deterministic for a given ``seed`` and independent of
    ``batch_size``.
    """
    if k < 1:
        raise ConfigError(f"k={k}: the noise + denoise round trip must run at least once")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    x = x0
    for r in range(k):
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            w = torch.stack([_noise(tuple(xb.shape[1:]), seed, r, i + j) for j in range(xb.shape[0])]).to(xb)
            x_t0 = add_noise(xb, t0, schedule, noise=w)
            gen = torch.Generator().manual_seed(_derived_seed(seed, r, i, -1)) if eta > 0 else None
            out.append(generate(eps_fn, x_t0, t0, n_gen_steps, schedule, eta=eta, generator=gen, disable=disable))
        x = torch.cat(out)
    return x


@dataclass
class TranslateResult:
    """Output of :func:`translate`: ``domain`` (step 1, in the trained domain), ``latents`` (its inversion
    ``x_t0``) and ``edited`` (step 2), all [N,3,H,W]."""

    domain: torch.Tensor
    latents: torch.Tensor
    edited: torch.Tensor


@torch.no_grad()
def translate(
    original: EpsFn,
    x0: torch.Tensor,
    t0: int,
    schedule: Schedule,
    finetuned: EpsFn | None = None,
    k: int = 1,
    t0_edit: int | None = None,
    n_inv_steps: int = 40,
    n_gen_steps: int = 40,
    n_domain_steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    disable: bool = True,
) -> TranslateResult:
    """Unseen -> unseen translation (paper sec. 3.2, Fig. 4a); also stroke-conditioned generation (Fig. 4b).

    ``x0``: [N,3,H,W] in [-1,1]. Step 1: :func:`to_trained_domain` with the ORIGINAL model (``k`` rounds to
    ``t0``, ``n_domain_steps`` generation steps, default ``n_gen_steps``). Step 2: DDIM inversion of that
    image with the original model to ``t0_edit`` (default ``t0``, ``n_inv_steps``) and generation with
    ``finetuned`` (``n_gen_steps``; the original model when ``finetuned`` is None).
    """
    t0_edit = t0_edit or t0
    domain = to_trained_domain(original, x0, t0, n_domain_steps or n_gen_steps, schedule, k=k, seed=seed, eta=eta,
                               batch_size=batch_size, disable=disable)
    latents = invert_images(original, domain, t0_edit, n_inv_steps, schedule, batch_size, disable=disable)
    edited = generate_images(finetuned or original, latents, t0_edit, n_gen_steps, schedule, batch_size,
                             disable=disable)
    return TranslateResult(domain, latents, edited)


def from_strokes(
    original: EpsFn,
    strokes: torch.Tensor,
    t0: int,
    schedule: Schedule,
    finetuned: EpsFn | None = None,
    k: int = 2,
    **kwargs: Any,
) -> TranslateResult:
    """Stroke-conditioned generation (paper Fig. 4b): a rough colour-block painting ``strokes``
    ([N,3,H,W] in [-1,1]) -> a clean image of the trained domain (``domain``) -> edited by ``finetuned``.

    The same procedure as :func:`translate` (other keyword arguments pass through); the default ``k = 2``
    rounds clean strokes better than one (measured on the toy world, see tests/test_applications.py).
    """
    return translate(original, strokes, t0, schedule, finetuned=finetuned, k=k, **kwargs)


@dataclass(frozen=True, kw_only=True)
class TranslateJob(TranslateSettings):
    """Arguments of `dclip-ray translate` and `dclip-ray from-strokes` (see their --help): the inputs and
    models, plus the declared :class:`~dclip_ray.config.TranslateSettings`."""

    model: str
    images: str
    out: str
    finetuned: str | None = None
    preset: str | None = None
    kind: str = "translate"
    score_clip: str | None = None
    score_clip_weights: str | None = None
    trust_checkpoint: bool = False


SCORES_FILE = "scores.parquet"
"""In a translate OUT with a fine-tuned model: one manifest row per input key (ok, rejected or error) with
the edit's per-image scores (:data:`dclip_ray.io.manifest.SCORE_COLUMNS`)."""

REJECTED_DIR = "rejected"
"""``OUT/rejected/{key}.png``: an edit scored under ``--min-score``, kept for inspection, never in OUT."""


def _scorer(job: TranslateJob) -> tuple[Any, list[list[str]], list[str]]:
    """``(CLIP or None, [[source, target]], warnings)``: what scores the final edits, checked before any
    work. The edit is the fine-tuned model's (its card's source and target); the CLIP is ``--score-clip``,
    else the card's. ``--min-score`` needs both (:class:`ConfigError`); without it a missing one turns
    scoring off with a warning."""
    from dclip_ray.errors import DclipError
    from dclip_ray.models.clip import check_clip, load_clip

    if not job.finetuned:
        if job.min_score is not None:
            raise ConfigError(f"--min-score {job.min_score:g} scores the fine-tuned model's edits: pass --finetuned")
        return None, [], []
    card = read_card(job.finetuned)
    edits = card.edits
    name, weights = (job.score_clip, job.score_clip_weights) if job.score_clip else (card.clip, card.clip_weights)
    problem = ("its dclip.json names no source and target" if not edits else
               "no CLIP is known: pass --score-clip NAME (and --score-clip-weights PATH)" if not name else None)
    if problem is None:
        try:
            check_clip(str(name), weights, job.trust_checkpoint)
        except DclipError as e:
            problem = f"its CLIP {name} cannot be loaded ({e})"
    if problem is not None:
        if job.min_score is not None:
            raise ConfigError(f"--min-score {job.min_score:g}: the edits of {job.finetuned} cannot be scored: {problem}")
        return None, [], [f"the edits are not scored: {problem}"]
    return load_clip(str(name), weights=weights), edits, []


def _write_scored(job: TranslateJob, out: Path, keys: list[str], domain: torch.Tensor, edited: torch.Tensor,
                  errors: list[dict[str, Any]], clip: Any, edits: list[list[str]]) -> dict[str, Any]:
    """Write each final image (``OUT/{key}.png``, or ``OUT/rejected/{key}.png`` when scored under
    ``--min-score``) and, when scored, the manifest :data:`SCORES_FILE`; returns the summary's score fields.
    The edit scored is step 2 (``domain`` [N,3,H,W] -> ``edited``, both in [-1,1]): the part the fine-tuned
    model made."""
    from dclip_ray.io.manifest import ManifestRow, write_manifest
    from dclip_ray.scoring import ScoreStats, image_scores, rows_of

    rows = rows_of(image_scores(clip, domain, edited.clamp(-1, 1), edits)) if clip is not None else [{}] * len(keys)
    stats, manifest, rejected = ScoreStats(), [], []
    for key, xe, sc in zip(keys, edited, rows, strict=True):
        data = encode_png(xe)
        low = job.min_score is not None and sc.get("score", float("inf")) < job.min_score
        dest = (out / REJECTED_DIR if low else out) / f"{key}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        (out / (f"{key}.png" if low else f"{REJECTED_DIR}/{key}.png")).unlink(missing_ok=True)
        if "score" in sc:
            stats.add(sc["score"], "", key, rejected=low)
        sha = hashlib.sha256(data).hexdigest()
        if low:
            reason = f"edit scored {sc['score']:.4f} < --min-score {job.min_score:g}"
            rejected.append({"key": key, "score": sc["score"], "reason": reason})
            manifest.append(ManifestRow(key, "", "rejected", reason, sha, scores=sc))
        else:
            manifest.append(ManifestRow(key, "", "ok", None, sha, scores=sc))
    if clip is None:
        return {}
    manifest += [ManifestRow(str(e["key"]), str(e.get("shard") or ""), "error", str(e["error"])) for e in errors]
    write_manifest(manifest, str(out / SCORES_FILE))
    return {"scores": stats.summary(), "scored_edit": edits, "n_rejected": len(rejected), "rejected": rejected,
            "min_score": job.min_score, "manifest": str(out / SCORES_FILE)}


def run_translate(job: TranslateJob, progress: bool = True) -> dict[str, Any]:
    """Run :func:`translate` on the images of ``job.images``; write ``{out}/{key}.png`` (the final edit),
    ``{out}/domain/{key}.png`` (step 1), optionally ``grid.png`` (input / domain / edited rows) and the
    summary ``dclip_run.json``; return the summary. With a fine-tuned model every final edit is scored
    (step 1 -> final, the card's source -> target; :data:`SCORES_FILE`), and one under ``min_score`` goes
    to ``{out}/rejected/`` instead (``n_images`` counts the images in OUT)."""
    check_outputs({"--out": job.out}, {"--images": job.images, "--model": job.model, "--finetuned": job.finetuned})
    use_free_cores()
    base = load_base(job.model, job.preset)
    t0_edit = job.t0_edit
    ft_eps = None
    if job.finetuned:
        card = read_card(job.finetuned)
        check_base_model(base.sha256, job.model, {job.finetuned: card})
        t0_edit = t0_edit or edit_t0(None, [card], fallback=job.t0)
        ft_eps = strength_eps_fn(eps_fn_of(base.unet), eps_fn_of(load_unet(job.finetuned, base_unet=base.unet)),
                                job.strength)
    if not 1 <= job.t0 < base.schedule.num_timesteps:
        raise ConfigError(f"--t0 {job.t0} must be in [1, {base.schedule.num_timesteps - 1}]")
    clip, edits, warnings = _scorer(job)
    keys, x0, errors = read_images(job.images, base.resolution, job.limit)
    res = translate(eps_fn_of(base.unet), x0, job.t0, base.schedule, finetuned=ft_eps, k=job.k, t0_edit=t0_edit,
                    n_inv_steps=job.n_inv_steps, n_gen_steps=job.n_gen_steps, n_domain_steps=job.n_domain_steps,
                    eta=job.eta, seed=job.seed, batch_size=job.batch_size, disable=not progress)
    out = Path(job.out)
    (out / "domain").mkdir(parents=True, exist_ok=True)
    if job.min_score is not None:
        (out / REJECTED_DIR).mkdir(exist_ok=True)
    for key, xd in zip(keys, res.domain, strict=True):
        (out / "domain" / f"{key}.png").write_bytes(encode_png(xd))
    scored = _write_scored(job, out, keys, res.domain, res.edited, errors, clip, edits)
    for w in warnings:
        log.warning("%s", w)
    summary: dict[str, Any] = {"kind": job.kind, "out": str(out), "n_images": len(keys) - scored.get("n_rejected", 0),
                               "t0": job.t0, "t0_edit": t0_edit or job.t0, "k": job.k, "errors": errors,
                               **scored, "warnings": warnings,
                               "config": {**asdict(job), "images": abs_location(job.images)}}
    if job.grid:
        summary["grid"] = str(save_grid([x0[:16], res.domain[:16], res.edited[:16]], out / "grid.png"))
    (out / RUN_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary
