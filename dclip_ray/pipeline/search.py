"""`finetune --restarts N` and `finetune --search`: several fine-tunings of one prompt as Ray Tune trials,
each checked on held-aside images (:mod:`dclip_ray.quality`); the best is kept.

The trials are the recipe's own point (with ``--search``, also knob settings around it:
:func:`dclip_ray.search.trial_points`), each at seeds ``seed .. seed+restarts-1``. Each trial is a Tune
function trainable holding ``cpus_per_trial`` CPUs (no Train worker inside it, so no nested reservation:
see REFERENCE section 5); trials run in parallel as far as the cluster's CPUs and ``max_concurrent``
allow. The images go to the trials through the object store (``tune.with_parameters``); each trial loads
the base model and the CLIP by name, fine-tunes, measures its edits of the held-aside images and reports
the measurement with the saved model as its Tune checkpoint. The driver judges every trial by the same
bar, keeps the best that passes (else the best, which fails the prompt unless accepted) and moves its
model to ``--out``; the model card records every trial with its score. Tune persists the checkpoints
under its storage path, so across nodes that path must be shared (a single machine needs nothing).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import tune

from dclip_ray.config import FinetuneConfig, QualityCheck
from dclip_ray.errors import ConfigError
from dclip_ray.progress import progress as progress_counter
from dclip_ray.search import KNOBS, points_of

from .runtime import init_ray

ROW_KEYS = (*KNOBS, "seed", "score", "direction", "structure", "background", "spread", "final_loss", "seconds")
"""What the card and the summary record of each trial."""


@dataclass
class SearchJob:
    """How the trials run: ``trials`` knob settings (1: the recipe's own only; more with ``--search``), each
    at the config's ``restarts`` seeds; ``cpus_per_trial`` per trial, at most ``max_concurrent`` at once
    (None: as many as fit). The models are named as on the command line (``model``, ``preset``, ``clip``,
    ``clip_weights``; ``score_clip``: another CLIP for the score, default the loss's)."""

    model: str
    trials: int = 1
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    seed: int = 0
    preset: str | None = None
    clip: str | None = None
    clip_weights: str | None = None
    score_clip: str | None = None
    score_clip_weights: str | None = None
    check: QualityCheck = field(default_factory=QualityCheck)
    address: str | None = None
    num_cpus: int | None = None
    verbose: bool = False

    def check_budget(self) -> None:
        """Refuse bad budgets before anything starts (:class:`ConfigError`, exit 1)."""
        if self.trials < 1:
            raise ConfigError(f"--search-trials {self.trials} must be >= 1")
        if self.check.check_images < 1:
            raise ConfigError(f"--check-images {self.check.check_images} must be >= 1 with --search or --restarts "
                              "(the trials are compared by their edits of held-aside images)")
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"--cpus-per-trial {self.cpus_per_trial} must be > 0")


def _trial(config: dict[str, Any], job: SearchJob, cfg: FinetuneConfig, x_train: torch.Tensor,
           x_check: torch.Tensor, held_aside: bool) -> None:
    import math
    from dataclasses import replace

    from dclip_ray.edit import invert_images
    from dclip_ray.finetune import finetune, save_finetuned
    from dclip_ray.models import eps_fn_of
    from dclip_ray.models.base import resolve_clip
    from dclip_ray.models.cache import cached_base
    from dclip_ray.quality import check_model, weights_finite
    from dclip_ray.search import with_knobs

    torch.set_num_threads(max(1, int(job.cpus_per_trial)))
    point = config["point"]
    base = cached_base(job.model, job.preset)  # once per worker process, whatever the number of trials
    clip = resolve_clip(job.clip, job.clip_weights, base)
    score_clip = resolve_clip(job.score_clip, job.score_clip_weights, base) if job.score_clip else clip
    c = replace(with_knobs(cfg, point), seed=point["seed"])
    eps0 = eps_fn_of(base.unet)
    lat = invert_images(eps0, x_train, c.t0, c.n_inv_steps, base.schedule)
    res = finetune(base.unet, clip, x_train, lat, base.schedule, c)
    finite = weights_finite(res.unet) and math.isfinite(res.final_loss)
    measured = check_model(eps0, eps_fn_of(res.unet), score_clip, x_check, c, base.schedule, held_aside, finite,
                           latents=None if held_aside else lat[:len(x_check)])
    row = {**{k: getattr(c, k) for k in KNOBS}, "seed": c.seed, **measured,
           "final_loss": res.final_loss if math.isfinite(res.final_loss) else None, "seconds": round(res.seconds, 2)}
    with tempfile.TemporaryDirectory(prefix="dclip-trial-") as d:
        save_finetuned(res, d, c, base.unet, base.schedule_config, extra={"quality": {"measured": measured}})
        tune.report({"row": json.dumps(row)}, checkpoint=tune.Checkpoint.from_directory(d))


class _CountTrials(tune.Callback):
    """Counts finished trials on the driver's progress (a bar, or plain lines off a terminal)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.bar.update(1)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.bar.update(1)


def run_trials(job: SearchJob, cfg: FinetuneConfig, x_train: torch.Tensor, x_check: torch.Tensor,
               held_aside: bool, keep: str, progress: bool = False) -> list[dict[str, Any]]:
    """Run every trial (:func:`points_of`) on Ray Tune; each fine-tunes on ``x_train`` and is measured on
    ``x_check`` ([N,3,H,W] in [-1,1]). Returns one row per trial, in point order (:data:`ROW_KEYS` and the
    measurement), and copies each trial's saved model to ``keep/{i}`` (a local folder). ``progress``:
    count the finished trials (:func:`dclip_ray.progress.progress`)."""
    job.check_budget()
    init_ray(job.address, job.num_cpus, verbose=job.verbose)
    points = points_of(cfg, job.trials, job.seed)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job=job, cfg=cfg, x_train=x_train, x_check=x_check, held_aside=held_aside),
        {"cpu": job.cpus_per_trial})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dclip-search-") as storage, \
            progress_counter(len(points), "finetune trials", enabled=progress, unit="fine-tunings") as bar:
        tuner = tune.Tuner(
            trainable, param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(max_concurrent_trials=job.max_concurrent),
            run_config=tune.RunConfig(storage_path=os.path.abspath(storage), name="search", verbose=0,
                                      callbacks=[_CountTrials(bar)]))
        with contextlib.redirect_stdout(sys.stderr if job.verbose else io.StringIO()):  # stdout: --json only
            grid = tuner.fit()
        for r in grid:
            if r.error is not None:
                raise ConfigError(f"a fine-tuning trial failed: {type(r.error).__name__}: {r.error}"[:500])
            row = json.loads(r.metrics["row"])
            i = points.index({**{k: row[k] for k in KNOBS}, "seed": row["seed"]})
            assert r.checkpoint is not None
            r.checkpoint.to_directory(os.path.join(keep, str(i)))
            rows.append({**row, "trial": i})
    rows.sort(key=lambda r: r["trial"])
    return rows


def finetune_trials(job: Any, search: SearchJob, progress: bool = True) -> dict[str, Any]:
    """`finetune --restarts N` / `--search`: the trials of ``job.train`` (a :class:`~dclip_ray.jobs.FinetuneJob`)
    on its first ``n_train`` images, each checked on the next ``search.check.check_images``; the kept
    trial's model goes to ``job.out`` (``job.out + ".failed"`` when it fails the check, unless accepted),
    its card listing every trial. Returns the summary of :func:`~dclip_ray.jobs.run_finetune` plus
    ``trials`` (and ``search`` with ``--search``)."""
    from dclip_ray.finetune import copy_model
    from dclip_ray.jobs import card_extra, read_images
    from dclip_ray.models.base import load_base, resolve_clip
    from dclip_ray.quality import assess, choose, failed_path, judge, split_check, status_of

    search.check_budget()
    cfg = job.train
    base = load_base(job.model, job.preset)
    clip = resolve_clip(job.clip, job.clip_weights, base)
    keys, x, errors = read_images(job.images, base.resolution, cfg.n_train + search.check.check_images)
    x_train, x_check, held = split_check(x, cfg.n_train, search.check.check_images)
    warnings = [] if held else [f"{job.images} has no image beyond the {cfg.n_train} trained on: the trials were "
                                "compared on training images (add images to hold some aside)"]
    with tempfile.TemporaryDirectory(prefix="dclip-trials-") as keep:
        rows = run_trials(search, cfg, x_train, x_check, held, keep, progress=progress)
        bar = search.check.bar(base.preset)
        verdicts = [judge(r, bar, search.check.min_spread) for r in rows]
        for r, v in zip(rows, verdicts, strict=True):
            r.update(passed=v.passed, reason=v.reason)
        best = choose(verdicts)
        src = os.path.join(keep, str(best))
        with open(os.path.join(src, "dclip.json")) as f:
            card = json.load(f)
        quality = assess(card["quality"]["measured"], search.check, base.preset)
        status = status_of(quality)
        where = failed_path(job.out) if status == "failed (quality)" else job.out
        trials = {"rows": [{k: r.get(k) for k in (*ROW_KEYS, "passed", "reason")} for r in rows], "chosen": best,
                  "restarts": cfg.restarts, "score_clip": search.score_clip or clip.name,
                  "score": "direction - 0.5 * (1 - structure) - 4 * background (dclip_ray.scoring)"}
        card.update(card_extra(job, clip, keys[:cfg.n_train]), quality=quality, trials=trials)
        if search.trials > 1:
            card["search"] = {"knobs": list(KNOBS), "chosen": {k: rows[best][k] for k in KNOBS},
                              "score_keys": keys[cfg.n_train:] if held else []}
        copy_model(src, where, card)  # the card last: it marks the folder complete
    chosen = rows[best]
    summary = {"status": status, "model_path": where, "source": cfg.source, "target": cfg.target,
               "n_train": len(x_train), "final_loss": chosen["final_loss"], "seconds": chosen["seconds"],
               "quality": quality, "trials": trials, "warnings": warnings, "errors": errors,
               "config": card["config"]}
    if "search" in card:
        summary["search"] = {**card["search"], "trials": trials["rows"]}
    return summary
