"""The check a fine-tuned model passes before a prompt is called done (no Ray).

`finetune` and `finetune-many` edit a few held-aside images of the prompt's source (images the model
was not trained on) with the fine-tuned model, as a restyle would, and judge the result without a pixel
judge, from the same per-image score every restyle writes (:mod:`dclip_ray.scoring`):

- ``score``: the mean judge-free score of the edits; under the bar (``--min-quality``, else the model
  preset's ``quality_bar``; none for a model without one) the prompt fails;
- ``spread``: how much the outputs differ from one another against how much the inputs do (the mean
  over pixels of the across-image standard deviation, outputs over inputs). An edit keeps each image's
  own layout, so it stays near 1; a model that draws the same picture whatever the input (a collapse:
  every output one square filling the frame) falls towards 0. Under ``--min-spread`` the prompt fails;
- non-finite weights or outputs (a diverged fine-tuning) always fail.

With restarts (``restarts=N``: N fine-tunings from seeds s..s+N-1), the restart kept is the best-scored
one that passes, else the best-scored one (which then fails the prompt unless ``--accept-low-quality``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dclip_ray.config import QualityCheck
from dclip_ray.scoring import ScoreWeights, image_scores

__all__ = ["CHECK_GEN_STEPS", "DIVERGED", "FAILED_SUFFIX", "Verdict", "assess", "check_model", "choose", "failed_path", "judge",
           "measure_edits", "output_spread", "quality_record", "split_check", "status_of", "weights_finite"]


def output_spread(before: torch.Tensor, after: torch.Tensor) -> float:
    """How much outputs vary across images against how much their inputs do: the mean over pixels of the
    across-image std of ``after`` over that of ``before`` (both [N,3,H,W] in [-1,1], N >= 2). About 1 for
    an edit that keeps each image's layout, near 0 when every input gives the same output; nan with
    fewer than 2 images or inputs that do not vary."""
    if before.shape[0] < 2:
        return float("nan")
    sb = before.float().clamp(-1, 1).std(0).mean()
    sa = after.float().clamp(-1, 1).std(0).mean()
    return float(sa / sb) if float(sb) > 1e-6 else float("nan")


def weights_finite(module: torch.nn.Module) -> bool:
    """True when every trainable parameter of ``module`` is finite (a diverged fine-tuning is not)."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Verdict:
    """The check of one fine-tuned model: the means of the per-image scores of its edits of ``n_images``
    images (``held_aside``: not trained on), their ``spread`` (:func:`output_spread`), the bar and the
    spread minimum it was held to, and whether it ``passed`` (else ``reason``, one line)."""

    score: float
    direction: float
    structure: float
    background: float
    spread: float
    n_images: int
    held_aside: bool
    min_quality: float | None
    min_spread: float
    passed: bool
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON data (non-finite numbers as None), for model cards and summaries."""
        return _plain(asdict(self))


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with floats rounded to 6 places and non-finite ones as None (strict JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else round(v, 6) if isinstance(v, float)
                else v) for k, v in d.items()}


def judge(measured: dict[str, Any] | None, min_quality: float | None, min_spread: float) -> Verdict:
    """The verdict on a model from its measurement (:func:`measure_edits`, or the ``quality`` of a model
    card: ``score``, ``direction``, ``structure``, ``background``, ``spread``, ``n_images``,
    ``held_aside``, ``finite``; missing or None numbers read as non-finite) against ``min_quality`` (None:
    no bar) and ``min_spread``. Pure: a new bar re-judges a stored measurement, nothing is re-generated.
    ``measured`` None (the check was off): passed, every number nan."""
    if measured is None:
        nan = float("nan")
        return Verdict(nan, nan, nan, nan, nan, 0, False, min_quality, min_spread, True, None)
    def num(k: str) -> float:
        v = measured.get(k)
        return float(v) if isinstance(v, (int, float)) else float("nan")

    parts = {k: num(k) for k in ("score", "direction", "structure", "background")}
    spread, n, held = num("spread"), int(measured.get("n_images") or 0), bool(measured.get("held_aside"))
    reason = None
    if not measured.get("finite", True) or not all(math.isfinite(v) for v in parts.values()):
        reason = "the model diverged: non-finite weights or outputs (lower the learning rate)"
    elif math.isfinite(spread) and spread < min_spread:
        reason = (f"its outputs no longer depend on their inputs: they vary {spread:.2f}x as much as the inputs "
                  f"(< --min-spread {min_spread:g}); the fine-tuning collapsed to one picture")
    elif min_quality is not None and parts["score"] < min_quality:
        reason = (f"its edits of {n} {'held-aside' if held else 'training'} images score {parts['score']:.3f} "
                  f"(< --min-quality {min_quality:g}; direction {parts['direction']:.3f}, structure "
                  f"{parts['structure']:.3f}, background {parts['background']:.3f})")
    return Verdict(parts["score"], parts["direction"], parts["structure"], parts["background"], spread, n, held,
                   min_quality, min_spread, reason is None, reason)


@torch.no_grad()
def measure_edits(clip: Any, before: torch.Tensor, after: torch.Tensor, source: str, target: str,
                  held_aside: bool = True, finite: bool = True, weights: ScoreWeights = ScoreWeights(),
                  ) -> dict[str, Any]:
    """What the check judges, measured on a model's edits ``before`` -> ``after`` ([N,3,H,W] in [-1,1],
    N >= 1) of ``source`` -> ``target``: the means of the judge-free per-image scores
    (:func:`dclip_ray.scoring.image_scores`), the :func:`output_spread`, ``n_images``, ``held_aside`` and
    ``finite`` (False when the weights, given, or the outputs are not). Plain strict-JSON data (non-finite
    numbers as None), stored in the model card."""
    finite = finite and bool(torch.isfinite(after).all())
    out: dict[str, Any] = {"n_images": int(before.shape[0]), "held_aside": held_aside, "finite": finite}
    if finite:
        per = image_scores(clip, before, after.clamp(-1, 1), [(source, target)], weights)
        out.update({k: float(per[k].float().mean()) for k in ("score", "direction", "structure", "background")})
        out["spread"] = output_spread(before, after)
    return _plain(out)


def choose(verdicts: list[Verdict]) -> int:
    """The index of the restart to keep: the best-scored that passed, else the best-scored (a non-finite
    score ranks last)."""
    if not verdicts:
        raise ValueError("choose needs at least one verdict")

    def key(i: int) -> tuple[bool, float]:
        s = verdicts[i].score
        return verdicts[i].passed, s if math.isfinite(s) else -math.inf

    return max(range(len(verdicts)), key=key)


DIVERGED: dict[str, Any] = {"n_images": 0, "held_aside": False, "finite": False}
"""The measurement of a model whose loss or weights are not finite, when no image was checked
(``--check-images 0``): divergence fails a prompt whatever the check settings."""

CHECK_GEN_STEPS = 40
"""Generation steps of the check's edits: restyle's default S_gen, so the check sees what a restyle makes."""

FAILED_SUFFIX = ".failed"
"""A model that fails its check is saved beside where it would go, as ``OUT.failed`` (never at ``OUT``,
where a restyle would pick it up), with its verdict in the card."""


def failed_path(out: str) -> str:
    """Where a model meant for ``out`` (a folder, local or URL) goes when it fails its check."""
    return out.rstrip("/") + FAILED_SUFFIX


def split_check(x: torch.Tensor, n_train: int, n_check: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(training images, check images, held_aside)`` from images ``x`` [N,3,H,W]: the first ``n_train``
    train; the next ``n_check`` are held aside for the check, else (none left) the first ``n_check``
    training images are checked and ``held_aside`` is False."""
    train, rest = x[:n_train], x[n_train:n_train + n_check]
    if len(rest):
        return train, rest, True
    return train, train[:n_check], False


@torch.no_grad()
def check_model(base_eps: Any, tuned_eps: Any, clip: Any, x: torch.Tensor, cfg: Any, schedule: Any,
                held_aside: bool = True, finite: bool = True, latents: torch.Tensor | None = None,
                ) -> dict[str, Any]:
    """Measure a fine-tuned model for its check (:func:`measure_edits`): invert ``x`` ([N,3,H,W] in [-1,1])
    with the base model's ``base_eps`` at ``cfg.t0`` (or take ``latents``), generate with ``tuned_eps`` in
    :data:`CHECK_GEN_STEPS` steps, and score against ``cfg.source`` -> ``cfg.target``."""
    from dclip_ray.edit import generate_images, invert_images

    if latents is None:
        latents = invert_images(base_eps, x, cfg.t0, cfg.n_inv_steps, schedule)
    edits = generate_images(tuned_eps, latents, cfg.t0, CHECK_GEN_STEPS, schedule)
    return measure_edits(clip, x, edits, cfg.source, cfg.target, held_aside, finite)


def quality_record(measured: dict[str, Any], verdict: Verdict, accepted: bool) -> dict[str, Any]:
    """The card's and the summary's ``quality``: the measurement, the verdict and whether a failing model
    was kept anyway (``--accept-low-quality``; never a diverged one)."""
    v = verdict.as_dict()
    diverged = not measured.get("finite", True)  # never kept: its weights are not numbers
    return {"measured": measured, "passed": v["passed"], "reason": v["reason"], "min_quality": v["min_quality"],
            "min_spread": v["min_spread"], "accepted_low_quality": bool(accepted and not v["passed"] and not diverged)}


def status_of(quality: dict[str, Any]) -> str:
    """A prompt's status from its ``quality`` record (:func:`~dclip_ray.quality.quality_record`): "ok",
    "ok (low quality, accepted)" or "failed (quality)"."""
    if quality.get("passed", True):
        return "ok"
    return "ok (low quality, accepted)" if quality.get("accepted_low_quality") else "failed (quality)"


def assess(measured: dict[str, Any] | None, check: QualityCheck, preset: Any) -> dict[str, Any]:
    """The ``quality`` record of a model measured as ``measured`` (:func:`check_model`, :data:`DIVERGED`,
    or None when nothing was checked: an empty record, which :func:`status_of` reads as "ok") under the
    ``check``'s settings and the bar of the model ``preset``."""
    if measured is None:
        return {}
    verdict = judge(measured, check.bar(preset), check.min_spread)
    return quality_record(measured, verdict, check.accept_low_quality)
