"""Recipe search without a pixel judge: the knobs a search varies around a recipe, and the score it
ranks trials by (Ray-free; the Ray Tune wiring is :mod:`dclip_ray.pipeline.search`).

A trial's score is the mean, over images the trial did not train on, of the per-image score every
restyle writes (:mod:`dclip_ray.scoring`: directional CLIP similarity, structure kept, outer-frame
change), measured with the loss's CLIP unless ``--score-clip`` names another (the loss saw augmented
views of the training images, not these images). How well it ranks
trials as the toy judge does is measured by the ``recipes`` benchmark (Spearman over trials).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from typing import Any

import torch

from dclip_ray.config import FinetuneConfig
from dclip_ray.scoring import ScoreWeights, frame_change, image_scores

__all__ = ["KNOBS", "ScoreWeights", "edit_score", "frame_change", "knob_values", "points_of", "run_trial",
           "spearman", "trial_points", "with_knobs"]

KNOBS: tuple[str, ...] = ("t0", "lr", "w_l1", "w_edge")
"""The settings a search varies (FinetuneConfig fields): return step, learning rate, L1 and edge weights."""


def knob_values(cfg: FinetuneConfig) -> dict[str, list[Any]]:
    """The values tried per knob around ``cfg`` (the recipe's point in the middle): t0 -50/0/+50, lr and
    the L1 weight x0.5/x1/x2 (L1 0: 0, 0.5, 1), the edge weight x0.5/x1/x2 when the recipe uses it
    (an edit without it, a shape change, keeps it off)."""
    def scaled(v: float, zero: list[float]) -> list[float]:
        return [v * 0.5, v, v * 2.0] if v > 0 else zero
    return {"t0": sorted({max(1, cfg.t0 - 50), cfg.t0, min(999, cfg.t0 + 50)}),
            "lr": scaled(cfg.lr, [cfg.lr]),
            "w_l1": scaled(cfg.w_l1, [0.0, 0.5, 1.0]),
            "w_edge": scaled(cfg.w_edge, [0.0])}


def trial_points(cfg: FinetuneConfig, n_trials: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n_trials`` distinct knob settings: the recipe's own point first, then a seeded random draw from
    the grid of :func:`knob_values` (all of it when it is smaller)."""
    values = knob_values(cfg)
    own = {k: getattr(cfg, k) for k in KNOBS}
    grid = [dict(zip(KNOBS, combo, strict=True)) for combo in itertools.product(*(values[k] for k in KNOBS))]
    rest = [p for p in grid if p != own]
    random.Random(seed).shuffle(rest)
    return [own, *rest][:max(1, n_trials)]


def with_knobs(cfg: FinetuneConfig, point: dict[str, Any]) -> FinetuneConfig:
    """``cfg`` with the knob values of ``point`` (and its ``seed``, when it has one), validated by the
    declared rules."""
    return replace(cfg, **{k: point[k] for k in (*KNOBS, "seed") if k in point})


def points_of(cfg: FinetuneConfig, trials: int, seed: int = 0) -> list[dict[str, Any]]:
    """Every fine-tuning of one prompt: :func:`trial_points` (``trials`` of them, the recipe's own first),
    each at seeds ``cfg.seed .. cfg.seed + cfg.restarts - 1`` (``"seed"`` in the point)."""
    return [{**p, "seed": cfg.seed + k} for p in trial_points(cfg, trials, seed) for k in range(cfg.restarts)]


def edit_score(clip: Any, before: torch.Tensor, after: torch.Tensor, source: str, target: str,
               weights: ScoreWeights = ScoreWeights()) -> dict[str, float]:
    """The judge-free score of edits ``before`` -> ``after`` ([B,3,H,W] in [-1,1]) of ``source`` ->
    ``target``: the means of :func:`dclip_ray.scoring.image_scores` (``{"score", "direction", "structure",
    "background"}``)."""
    parts = image_scores(clip, before, after, [(source, target)], weights)
    return {k: float(v.mean()) for k, v in parts.items()}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equal-length lists (torchmetrics; ties get average ranks), nan
    when either list is constant (no ranking to compare)."""
    from torchmetrics.functional import spearman_corrcoef

    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearman_corrcoef(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))


def run_trial(unet: torch.nn.Module, clip: Any, x_train: torch.Tensor, x_score: torch.Tensor, schedule: Any,
              cfg: FinetuneConfig, point: dict[str, Any], score_clip: Any = None,
              weights: ScoreWeights = ScoreWeights(), n_gen_steps: int = 40,
              ) -> tuple[dict[str, Any], Any, torch.Tensor]:
    """One trial: fine-tune a copy of ``unet`` with ``cfg`` at ``point``'s knobs on ``x_train`` (inverted
    at the trial's t0) and score its edits of ``x_score`` ([N,3,H,W] in [-1,1], not trained on) with
    ``score_clip`` (default ``clip``), generated in ``n_gen_steps`` as a restyle would. Returns ``(row, FinetuneResult, edits)``; ``row`` holds the knobs,
    the score parts, the final loss and the seconds."""
    from dclip_ray.edit import generate_images, invert_images
    from dclip_ray.finetune import finetune
    from dclip_ray.models import eps_fn_of

    c = with_knobs(cfg, point)
    eps0 = eps_fn_of(unet)
    lat_train = invert_images(eps0, x_train, c.t0, c.n_inv_steps, schedule)
    lat_score = invert_images(eps0, x_score, c.t0, c.n_inv_steps, schedule)
    res = finetune(unet, clip, x_train, lat_train, schedule, c)
    edits = generate_images(eps_fn_of(res.unet), lat_score, c.t0, n_gen_steps, schedule)
    parts = edit_score(score_clip or clip, x_score, edits, c.source, c.target, weights)
    row = {**{k: getattr(c, k) for k in KNOBS}, **parts, "final_loss": res.final_loss,
           "seconds": round(res.seconds, 2)}
    return row, res, edits
