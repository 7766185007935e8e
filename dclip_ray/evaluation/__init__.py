"""Evaluation of edits and runs: metrics (:mod:`.metrics`), `dclip-ray eval` (:mod:`.evaluate`) and the
self-contained HTML report (:mod:`.report`)."""

from __future__ import annotations

from .evaluate import EvalJob, evaluate, load_pairs, write_eval
from .metrics import (
    clip_score,
    directional_similarity,
    fid_kid,
    identity_similarity,
    judge_success,
    psnr,
    ssim,
    summarize,
)
from .report import write_report

__all__ = [
    "EvalJob",
    "clip_score",
    "directional_similarity",
    "evaluate",
    "fid_kid",
    "identity_similarity",
    "judge_success",
    "load_pairs",
    "psnr",
    "ssim",
    "summarize",
    "write_eval",
    "write_report",
]
