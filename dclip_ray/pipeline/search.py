"""`finetune --search`: Ray Tune trials around a recipe, ranked by the judge-free score of
:mod:`dclip_ray.search`; the best trial's settings are what the model is then trained with.

Each trial is a Tune function trainable holding ``cpus_per_trial`` CPUs (no Train worker inside it, so
no nested reservation: see REFERENCE section 5); trials run in parallel as far as the cluster's CPUs
and ``max_concurrent`` allow. The images go to the trials through the object store
(``tune.with_parameters``); each trial loads the base model and the CLIP by name, as Train workers do.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from ray import tune

from dclip_ray.config import FinetuneConfig
from dclip_ray.errors import ConfigError
from dclip_ray.search import KNOBS, ScoreWeights, run_trial, trial_points

from .runtime import init_ray


@dataclass
class SearchJob:
    """How a search runs: ``trials`` knob settings (the recipe's own first), scored on ``score_images``
    images not trained on; ``cpus_per_trial`` per trial, at most ``max_concurrent`` at once (None: as many
    as fit). The models are named as on the command line (``model``, ``preset``, ``clip``,
    ``clip_weights``; ``score_clip``: another CLIP for the score, default the loss's)."""

    model: str
    trials: int = 8
    score_images: int = 8
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    seed: int = 0
    preset: str | None = None
    clip: str | None = None
    clip_weights: str | None = None
    score_clip: str | None = None
    score_clip_weights: str | None = None
    address: str | None = None
    num_cpus: int | None = None
    verbose: bool = False

    def check(self) -> None:
        """Refuse bad budgets before anything starts (:class:`ConfigError`, exit 1)."""
        if self.trials < 1:
            raise ConfigError(f"--search-trials {self.trials} must be >= 1")
        if self.score_images < 1:
            raise ConfigError(f"--search-images {self.score_images} must be >= 1 (images scored, not trained on)")
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"--cpus-per-trial {self.cpus_per_trial} must be > 0")


def _trial(config: dict[str, Any], job: SearchJob, cfg: FinetuneConfig, x_train: torch.Tensor,
           x_score: torch.Tensor) -> None:
    from dclip_ray.models.base import resolve_clip
    from dclip_ray.models.cache import cached_base

    torch.set_num_threads(max(1, int(job.cpus_per_trial)))
    base = cached_base(job.model, job.preset)  # once per worker process, whatever the number of trials
    clip = resolve_clip(job.clip, job.clip_weights, base)
    score_clip = resolve_clip(job.score_clip, job.score_clip_weights, base) if job.score_clip else None
    row, _, _ = run_trial(base.unet, clip, x_train, x_score, base.schedule, cfg, config["point"], score_clip,
                          ScoreWeights())
    tune.report(row)


def run_search(job: SearchJob, cfg: FinetuneConfig, x_train: torch.Tensor, x_score: torch.Tensor,
               ) -> dict[str, Any]:
    """Run the trials; returns ``{"trials": [rows, the recipe's first], "best": row, "knobs": KNOBS,
    "score": how it is computed}``. ``x_train`` / ``x_score``: [N,3,H,W] in [-1,1]."""
    job.check()
    init_ray(job.address, job.num_cpus, verbose=job.verbose)
    points = trial_points(cfg, job.trials, job.seed)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job=job, cfg=cfg, x_train=x_train, x_score=x_score),
        {"cpu": job.cpus_per_trial})
    with tempfile.TemporaryDirectory(prefix="dclip-search-") as storage:
        tuner = tune.Tuner(
            trainable, param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=job.max_concurrent),
            run_config=tune.RunConfig(storage_path=os.path.abspath(storage), name="search", verbose=0))
        with contextlib.redirect_stdout(sys.stderr if job.verbose else io.StringIO()):  # stdout: --json only
            grid = tuner.fit()
        rows = []
        for r in grid:
            if r.error is not None:
                raise ConfigError(f"a search trial failed: {type(r.error).__name__}: {r.error}")
            rows.append({k: r.metrics[k] for k in (*KNOBS, "score", "direction", "structure", "background",
                                                   "final_loss", "seconds")})
    order = {tuple(p[k] for k in KNOBS): i for i, p in enumerate(points)}
    rows.sort(key=lambda r: order.get(tuple(r[k] for k in KNOBS), len(order)))
    best = max(rows, key=lambda r: r["score"])
    return {"trials": rows, "best": best, "knobs": list(KNOBS), "score_clip": job.score_clip or job.clip,
            "score": "direction - 0.5 * (1 - structure) - 4 * background (dclip_ray.search)"}


def search_and_finetune(job: Any, search: SearchJob, progress: bool = True) -> dict[str, Any]:
    """`finetune --search`: search around ``job.train`` (a :class:`~dclip_ray.jobs.FinetuneJob`) on its first
    ``n_train`` images, scoring on the next ``search.score_images``; then fine-tune with the best trial's
    settings and save, the search (every trial, the chosen one, its score) in the model card."""
    from dataclasses import replace

    from dclip_ray.jobs import read_images, run_finetune
    from dclip_ray.models.base import load_base
    from dclip_ray.search import with_knobs

    search.check()
    base = load_base(job.model, job.preset)
    n = job.train.n_train
    keys, x, _ = read_images(job.images, base.resolution, n + search.score_images)
    if len(keys) < n + 1:
        raise ConfigError(f"--search needs images to score beyond the {n} it trains on; {job.images} has "
                          f"{len(keys)}: add images or lower --n-train / --search-images")
    found = run_search(search, job.train, x[:n], x[n:])
    cfg = with_knobs(job.train, found["best"])
    found["chosen"] = {k: found["best"][k] for k in KNOBS}
    found["score_keys"] = keys[n:]
    summary = run_finetune(replace(job, train=cfg, card={"search": found}), progress=progress)
    return {**summary, "search": found}
