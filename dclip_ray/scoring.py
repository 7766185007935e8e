"""The judge-free score of every edited image (no Ray): what restyle and edit write into each manifest
row, what ``--min-score`` rejects by, and what ``finetune --search`` ranks trials by (their mean).

Real data has no pixel judge, so the score uses only the image before and after the edit and a CLIP:

- ``direction``: directional CLIP similarity ``S_dir`` of the edit (the image change against the text
  change ``source -> target``), in [-1, 1]; a mix of several edits averages their directions;
- ``structure``: SSIM of the luminance of before and after, in [-1, 1] (the layout kept);
- ``background``: mean absolute change, in [0, 1], of the outer frame (1/8 of the side on each edge),
  where an object-centred image has its background;
- ``identity`` (faces, when a face model is given): cosine of the face embeddings before and after.

``score = direction - w_structure * (1 - structure) - w_background * background`` (identity is reported,
not added). :class:`ScoreStats` summarises a variant's scores in bounded memory whatever the number of
images (count, mean, extremes, a fixed-bin histogram for quantiles, the lowest-scored keys), and merges
across shards; its plain-data form travels in commit markers and Ray rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of the structure and background terms of the score."""

    structure: float = 0.5
    background: float = 4.0


def luma(x: torch.Tensor) -> torch.Tensor:
    """Luminance [B,1,H,W] in [0, 1] of images [B,3,H,W] in [-1, 1] (Rec. 601 weights)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x.clamp(-1, 1) + 1) / 2 * w).sum(1, keepdim=True)


def frame_mask(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The outer frame of an ``h x w`` image (width max(1, min(h, w) // 8) on each edge): bool [h, w]."""
    m = torch.ones(h, w, dtype=torch.bool, device=device)
    b = max(1, min(h, w) // 8)
    m[b:h - b, b:w - b] = False
    return m


def frame_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Mean absolute change [B] in [0, 1] of the outer frame (:func:`frame_mask`) of images [B,3,H,W]
    in [-1, 1]."""
    m = frame_mask(*before.shape[-2:], device=before.device)
    d = ((after.clamp(-1, 1) - before.clamp(-1, 1)).abs() / 2).mean(1)
    return d[:, m].mean(1)


def outline_similarity(before: torch.Tensor, after: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Where the edges are, kept whatever their colours: per image [B] in [-1, 1], the correlation of the
    colour-gradient magnitude maps of ``before`` and ``after`` ([B,3,H,W] in [-1,1]), each blurred by a
    Gaussian of ``sigma`` pixels first (a one-pixel shift is not a new outline). A recolour in place keeps
    ~1 whatever the new colour's contrast (a luminance SSIM falls when the colour changes brightness); a
    moved, rounded or erased outline falls (no edges left: 0)."""
    from dclip_ray.losses import edge_magnitude, gaussian_blur

    maps = [gaussian_blur(edge_magnitude(x.float().clamp(-1, 1)).unsqueeze(1), sigma).flatten(1) if sigma > 0
            else edge_magnitude(x.float().clamp(-1, 1)).flatten(1) for x in (before, after)]
    a, b = (m - m.mean(1, keepdim=True) for m in maps)
    denom = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)
    return ((a * b).sum(1) / denom).cpu()


@torch.no_grad()
def image_scores(clip: Any, before: torch.Tensor, after: torch.Tensor, edits: Sequence[Sequence[str]],
                 weights: ScoreWeights = ScoreWeights(), face: Any = None) -> dict[str, torch.Tensor]:
    """Per-image scores of the edits ``before`` -> ``after`` ([B,3,H,W] in [-1,1]) of ``edits``
    (``[(source, target), ...]``, at least one): ``{"score", "direction", "structure", "background"}``
    (+ ``"identity"`` with ``face``), each a float [B] on the CPU (see the module docstring)."""
    from dclip_ray.evaluation.metrics import directional_similarity, identity_similarity, ssim

    if not edits:
        raise ValueError("image_scores needs at least one (source, target) edit to score against")
    before, after = before.float(), after.float()
    direction = torch.stack([directional_similarity(clip, before, after, s, t).float() for s, t in edits]).mean(0)
    structure = ssim(luma(before), luma(after), data_range=1.0).float().cpu()
    background = frame_change(before, after).float().cpu()
    out = {"score": direction - weights.structure * (1 - structure) - weights.background * background,
           "direction": direction, "structure": structure, "background": background}
    if face is not None:
        out["identity"] = identity_similarity(face, before, after).float()
    return out


def rows_of(scores: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """``{name: [B]}`` -> one ``{name: value}`` per image, rounded to 6 places, non-finite values left
    out (a manifest never holds NaN)."""
    n = len(next(iter(scores.values()))) if scores else 0
    out = []
    for i in range(n):
        row = {}
        for k, v in scores.items():
            x = float(v[i])
            if math.isfinite(x):
                row[k] = round(x, 6)
        out.append(row)
    return out


HIST_LO, HIST_HI, HIST_BINS = -2.0, 1.0, 60
"""The fixed histogram of :class:`ScoreStats`: 60 bins of 0.05 over [-2, 1] (values outside go to the
end bins), so quantiles are read to +-0.025."""

N_LOWEST = 8
"""How many lowest-scored edits a :class:`ScoreStats` keeps."""


@dataclass
class ScoreStats:
    """A bounded summary of many scores: count, sum, min, max, a fixed-bin histogram and the
    :data:`N_LOWEST` lowest ``(score, shard, key)``; mergeable, and plain data via :meth:`as_dict`."""

    n: int = 0
    total: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    lowest: list[tuple[float, str, str]] = field(default_factory=list)
    n_rejected: int = 0

    def add(self, score: float, shard: str, key: str, rejected: bool = False) -> None:
        """Count one edit's ``score`` (``rejected``: it fell under ``--min-score``)."""
        self.n += 1
        self.total += score
        self.lo, self.hi = min(self.lo, score), max(self.hi, score)
        b = int((score - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS)
        self.hist[min(HIST_BINS - 1, max(0, b))] += 1
        self.n_rejected += int(rejected)
        self.lowest = sorted([*self.lowest, (round(score, 6), shard, key)])[:N_LOWEST]

    def merge(self, other: ScoreStats) -> ScoreStats:
        """Add ``other``'s counts into this one (returns self)."""
        self.n += other.n
        self.total += other.total
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)]
        self.n_rejected += other.n_rejected
        self.lowest = sorted([*self.lowest, *other.lowest])[:N_LOWEST]
        return self

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1) read from the histogram (bin centre, clamped to [min, max]); None
        when empty."""
        if self.n == 0:
            return None
        need, seen = q * self.n, 0
        width = (HIST_HI - HIST_LO) / HIST_BINS
        for i, c in enumerate(self.hist):
            seen += c
            if c and seen >= need:
                return round(min(self.hi, max(self.lo, HIST_LO + (i + 0.5) * width)), 4)
        return round(self.hi, 4)

    def summary(self) -> dict[str, Any]:
        """``{"n", "mean", "min", "p10", "p50", "p90", "max", "n_rejected", "lowest": [{"score", "shard",
        "key"}]}`` (quantiles to +-0.025; None fields when nothing was scored)."""
        if self.n == 0:
            return {"n": 0, "mean": None, "min": None, "p10": None, "p50": None, "p90": None, "max": None,
                    "n_rejected": 0, "lowest": []}
        return {"n": self.n, "mean": round(self.total / self.n, 4), "min": round(self.lo, 4),
                "p10": self.quantile(0.1), "p50": self.quantile(0.5), "p90": self.quantile(0.9),
                "max": round(self.hi, 4), "n_rejected": self.n_rejected,
                "lowest": [{"score": s, "shard": sh, "key": k} for s, sh, k in self.lowest]}

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON, commit markers, Ray rows); :meth:`from_dict` reads it back."""
        return {"n": self.n, "total": round(self.total, 6), "lo": None if self.n == 0 else self.lo,
                "hi": None if self.n == 0 else self.hi, "hist": list(self.hist), "n_rejected": self.n_rejected,
                "lowest": [list(x) for x in self.lowest]}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ScoreStats:
        """The stats :meth:`as_dict` wrote (empty stats for None or an older marker without them)."""
        if not d:
            return cls()
        return cls(n=int(d.get("n", 0)), total=float(d.get("total", 0.0)),
                   lo=math.inf if d.get("lo") is None else float(d["lo"]),
                   hi=-math.inf if d.get("hi") is None else float(d["hi"]),
                   hist=[int(c) for c in d.get("hist") or [0] * HIST_BINS], n_rejected=int(d.get("n_rejected", 0)),
                   lowest=[(float(s), str(sh), str(k)) for s, sh, k in d.get("lowest") or []])


def stats_of_rows(rows: Iterable[Any], shard: str | None = None) -> ScoreStats:
    """The :class:`ScoreStats` of manifest rows (``.key``, ``.shard``, ``.status``, ``.scores``): every row
    with a score, ``rejected`` ones counted as such; ``shard`` names their shard when given."""
    out = ScoreStats()
    for r in rows:
        if "score" in (r.scores or {}):
            out.add(float(r.scores["score"]), shard or r.shard, r.key, rejected=r.status == "rejected")
    return out


def merged(stats: Iterable[ScoreStats]) -> ScoreStats:
    """One :class:`ScoreStats` holding all of ``stats``."""
    out = ScoreStats()
    for s in stats:
        out.merge(s)
    return out


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` ranking the ``labels`` (True = good) above the others
    (torchmetrics; 0.5 = chance, 1 = every good above every bad); nan when one class is absent."""
    from torchmetrics.functional.classification import binary_auroc

    if len(set(labels)) < 2:
        return float("nan")
    return float(binary_auroc(torch.tensor(list(scores), dtype=torch.float64),
                              torch.tensor([int(b) for b in labels])))


def precision_recall_at(scores: Sequence[float], labels: Sequence[bool], threshold: float) -> dict[str, float]:
    """Keeping the edits scored >= ``threshold``: ``{"precision"`` (share of kept that are good),
    ``"recall"`` (share of good that are kept), ``"kept"`` (share kept)``}``."""
    kept = [lab for s, lab in zip(scores, labels, strict=True) if s >= threshold]
    n_good = sum(bool(x) for x in labels)
    return {"precision": (sum(kept) / len(kept)) if kept else float("nan"),
            "recall": (sum(kept) / n_good) if n_good else float("nan"),
            "kept": len(kept) / max(1, len(scores))}
