"""Run one toy edit pair end to end for the held-out protocol: fine-tune with the pair's recipe on 16
images of its source, edit 32 other images of the source, judge them from pixels
(:func:`~dclip_ray.toyworld.pairs.judge_edit`). Used by the ``recipes`` benchmark and the slow tests."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from dclip_ray.config import resolve_finetune_config

from .pairs import EditPair, judge_edit
from .render import sample_dataset

TRAIN_SEED, EVAL_SEED = 101, 202
"""Render seeds of the training and the held-out images (the acceptance tests' own)."""


def _images(samples: list[Any]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1


class ToyProtocol:
    """The toy base model, schedule and CLIP loaded once; :meth:`run` evaluates one (pair, seed)."""

    def __init__(self, n_train: int = 16, n_eval: int = 32, n_steps: int = 40):
        from dclip_ray.diffusion import schedule_from_config
        from dclip_ray.models import get_preset, load_clip, load_schedule_config, load_unet

        self.preset = get_preset("toy_shapes")
        self.unet = load_unet("toy_shapes")
        self.schedule = schedule_from_config(load_schedule_config("toy_shapes"))
        self.clip = load_clip("toy_clip")
        self.n_train, self.n_eval, self.n_steps = n_train, n_eval, n_steps
        self._latents: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _data(self, pair: EditPair, t0: int, n_train: int | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """``(training images, their latents at t0, the held-out latents, the held-out source masks)``;
        ``n_train`` training renders (default the protocol's; the first 16 are the same whatever the number)."""
        from dclip_ray.edit import invert_images
        from dclip_ray.models import eps_fn_of

        n_train = n_train or self.n_train
        train = sample_dataset(n_train, TRAIN_SEED, colours=[pair.colour], shapes=[pair.shape])
        held = sample_dataset(self.n_eval, EVAL_SEED, colours=[pair.colour], shapes=[pair.shape])
        x_train, x_eval = _images(train), _images(held)
        if (pair.source, t0, n_train) not in self._latents:
            eps = eps_fn_of(self.unet)
            self._latents[pair.source, t0, n_train] = (
                invert_images(eps, x_train, t0, self.n_steps, self.schedule, batch_size=32),
                invert_images(eps, x_eval, t0, self.n_steps, self.schedule, batch_size=32))
        lat_train, lat_eval = self._latents[pair.source, t0, n_train]
        return x_train, lat_train, lat_eval, np.stack([s.mask for s in held])

    def run(self, pair: EditPair, seed: int = 0, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fine-tune ``pair`` with its recipe (:attr:`~dclip_ray.toyworld.pairs.EditPair.recipe`) and ``overrides`` (FinetuneConfig fields) at
        fine-tuning ``seed``; returns the :class:`~dclip_ray.toyworld.pairs.PairResult` fields, the pair,
        seed, recipe, overrides and seconds."""
        start = time.perf_counter()
        cfg, _, edits, masks = self._tuned(pair, seed, overrides)
        judged = judge_edit(pair, edits, masks)
        return {"pair": pair.name, "kind": pair.kind, "seed": seed, "recipe": cfg.recipe,
                "overrides": dict(overrides or {}), **asdict(judged), "seconds": round(time.perf_counter() - start, 1)}

    def edits(self, pair: EditPair, seed: int = 0, overrides: dict[str, Any] | None = None,
              ) -> tuple[Any, torch.Tensor, torch.Tensor, np.ndarray]:
        """Fine-tune ``pair`` as :meth:`run` does and edit the held-out images: ``(FinetuneConfig, inputs
        [N,3,H,W] in [-1,1], edits [N,3,H,W] in [-1,1], source masks bool [N,H,W])``."""
        cfg, _, edits, masks = self._tuned(pair, seed, overrides)
        x_eval = _images(sample_dataset(self.n_eval, EVAL_SEED, colours=[pair.colour], shapes=[pair.shape]))
        return cfg, x_eval, edits, masks

    def _tuned(self, pair: EditPair, seed: int, overrides: dict[str, Any] | None,
               ) -> tuple[Any, Any, torch.Tensor, np.ndarray]:
        """``(FinetuneConfig, FinetuneResult, edits of the held-out images [N,3,H,W] in [-1,1], their
        source masks)``: one fine-tuning of ``pair`` at ``seed``."""
        from dclip_ray.edit import generate_images
        from dclip_ray.finetune import finetune
        from dclip_ray.models import eps_fn_of

        cfg = self.config(pair, seed, overrides)
        x_train, lat_train, lat_eval, masks = self._data(pair, cfg.t0, cfg.n_train)
        res = finetune(self.unet, self.clip, x_train, lat_train, self.schedule, cfg)
        edits = generate_images(eps_fn_of(res.unet), lat_eval, cfg.t0, self.n_steps, self.schedule, batch_size=32)
        return cfg, res, edits, masks

    def config(self, pair: EditPair, seed: int = 0, overrides: dict[str, Any] | None = None) -> Any:
        """The :class:`~dclip_ray.config.FinetuneConfig` a user gets for ``pair`` (its recipe, the model
        preset's defaults) with ``overrides`` at fine-tuning ``seed``."""
        return resolve_finetune_config(pair.source, pair.target, {**(overrides or {}), "seed": seed},
                                       {"recipe": pair.recipe, "n_train": self.n_train}, preset=self.preset)

    def checked(self, pair: EditPair, seed: int = 0, overrides: dict[str, Any] | None = None,
                n_check: int = 8) -> dict[str, Any]:
        """One fine-tuning of ``pair`` at ``seed`` (its restarts setting ignored: one seed), measured as
        finetune's check measures it (:func:`dclip_ray.quality.check_model`: edits of ``n_check`` renders
        of the source neither trained on nor judged, render seed :data:`SCORE_SEED`, judge-free) AND
        judged from pixels on the held-out images: the :meth:`run` fields plus ``check`` (the
        measurement) and ``key`` (:func:`run_key`)."""
        from dclip_ray.models import eps_fn_of
        from dclip_ray.quality import check_model, weights_finite

        start = time.perf_counter()
        cfg, res, edits, masks = self._tuned(pair, seed, overrides)
        x_check = _images(sample_dataset(n_check, SCORE_SEED, colours=[pair.colour], shapes=[pair.shape]))
        finite = weights_finite(res.unet) and math.isfinite(res.final_loss)
        measured = check_model(eps_fn_of(self.unet), eps_fn_of(res.unet), self.clip, x_check, cfg, self.schedule,
                               finite=finite)
        judged = judge_edit(pair, edits, masks)
        return {"pair": pair.name, "kind": pair.kind, "seed": seed, "recipe": cfg.recipe, "adapter": cfg.adapter,
                "overrides": dict(overrides or {}), "key": run_key(cfg), **asdict(judged), "check": measured,
                "seconds": round(time.perf_counter() - start, 1)}


def run_key(cfg: Any) -> str:
    """What makes two protocol fine-tunings the same (12 hex): the sha256 of the config's settings that
    differ from their declared defaults, without those that choose AMONG fine-tunings (``restarts``,
    ``search_trials``): restarts reuse single runs, and a new setting (at its default) keeps stored runs."""
    from dataclasses import fields

    from dclip_ray.hashing import config_sha256

    own = {f.name: getattr(cfg, f.name) for f in fields(cfg)
           if f.name not in ("restarts", "search_trials") and getattr(cfg, f.name) != f.default}
    return config_sha256(own)[:12]


def kept_of(runs: list[dict[str, Any]], bar: float | None, min_spread: float) -> int:
    """Which of a prompt's restarts (:meth:`ToyProtocol.checked` rows, seeds s..s+N-1) finetune keeps:
    :func:`dclip_ray.quality.choose` over their check verdicts (the best-scored that passed, else the best)."""
    from dclip_ray.quality import choose, judge

    return choose([judge(r["check"], bar, min_spread) for r in runs])


def meets_goals(row: dict[str, Any]) -> list[str]:
    """The issue-20 goals a result misses (empty when all hold): colour >= 90 % success, mean IoU >= 0.85,
    background <= 6/255; shape >= 80 % success, background <= 6/255."""
    miss = []
    if row["kind"] == "colour":
        if row["success"] < 0.90:
            miss.append(f"success {row['success']:.0%} < 90%")
        if row["iou"] < 0.85:
            miss.append(f"IoU {row['iou']:.3f} < 0.85")
    elif row["success"] < 0.80:
        miss.append(f"success {row['success']:.0%} < 80%")
    if row["background"] > 6.0:
        miss.append(f"background {row['background']:.1f}/255 > 6")
    return miss


SCORE_SEED = 303
"""Render seed of the images a search scores on (neither trained on nor judged)."""


def judge_quality(row: dict[str, Any]) -> float:
    """One number per judged result, for ranking trials as the judge would: the success rate, then (a
    tenth as much) the IoU for colour edits, less the background error in /255 over 100."""
    return row["success"] + (row["iou"] / 10 if row["kind"] == "colour" else 0.0) - row["background"] / 100


def search_trials(proto: ToyProtocol, pair: EditPair, n_trials: int, seed: int = 0, n_score: int = 8,
                  ) -> list[dict[str, Any]]:
    """A search on ``pair`` as `finetune --search` runs it (trial points around the recipe, the judge-free
    score on ``n_score`` images of the source not trained on), in this process, with every trial ALSO
    judged on the held-out images: ``[{knobs, score parts, success, iou, background, ...}]``, the
    recipe's own point first."""
    from dclip_ray.edit import generate_images
    from dclip_ray.models import eps_fn_of
    from dclip_ray.search import run_trial, trial_points

    cfg = resolve_finetune_config(pair.source, pair.target, {"seed": seed},
                                  {"recipe": pair.recipe, "n_train": proto.n_train}, preset=proto.preset)
    x_score = _images(sample_dataset(n_score, SCORE_SEED, colours=[pair.colour], shapes=[pair.shape]))
    rows = []
    for point in trial_points(cfg, n_trials, seed):
        x_train, _, lat_eval, masks = proto._data(pair, point["t0"])
        row, res, _ = run_trial(proto.unet, proto.clip, x_train, x_score, proto.schedule, cfg, point)
        edits = generate_images(eps_fn_of(res.unet), lat_eval, point["t0"], proto.n_steps, proto.schedule,
                                batch_size=32)
        rows.append({"pair": pair.name, "kind": pair.kind, "seed": seed, **row,
                     **asdict(judge_edit(pair, edits, masks))})
    return rows
