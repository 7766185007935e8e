"""Which images an edit is meant for (no Ray): a prompt's SOURCE text against each sample.

Two judges, per sample:

- **caption** (when the sample has one: its ``.txt`` member, else the ``caption`` of an img2dataset
  ``.json``): the sample matches a source when every word of the source is a word of the caption
  (lowercase; articles dropped; a trailing plural ``s`` ignored), so ``circle`` matches
  ``a small red circle`` and ``red circle`` does not match ``a blue circle``. Confidence 1.
- **clip** (no caption): zero-shot with a CLIP. The image is scored against the source and its
  competitors: the texts that are neither a word-subset nor a word-superset of it among the CLIP's
  ``vocabulary``, the run's own sources and targets, and a neutral set (:data:`NEUTRAL`). The source's
  class is the source text and every text holding all its words (``circle`` -> ``red circle``, ...);
  the image matches when the best-scoring text is in that class; the confidence is the class's total
  softmax probability (CLIP's logit scale). The toy CLIP's preset gives its 12 classes as vocabulary;
  a general CLIP (ViT-B/16) has none: the neutral set and the run's texts are what a source competes
  with, so a run with a single source relies on the neutral set.

A folder of image files has no captions (sidecar ``.txt`` files are not read): it is judged by CLIP.

:func:`select_training_sets` streams the input once, shard by shard, until every prompt has
``n_train`` matching images (fine-tuning); :class:`SourceMatcher` is what the restyle's
``--route source`` asks per image.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dclip_ray.io.sources import caption_of

from .inputs import Decoded, batched, decode_shard

NEUTRAL: tuple[str, ...] = ("thing", "object", "scene", "pattern", "texture")
"""Texts every source competes with in zero-shot matching (a sample matching none of the sources
better than these is no one's)."""

_ARTICLES = frozenset({"a", "an", "the"})


def words(text: str) -> frozenset[str]:
    """The comparable words of a text: lowercase alphanumeric runs, articles dropped, a trailing ``s``
    of a word longer than 3 letters removed (``"Red Circles."`` -> ``{"red", "circle"}``)."""
    out = set()
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        if w in _ARTICLES:
            continue
        out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return frozenset(out)


def caption_matches(caption: str, source: str) -> bool:
    """True when every word of ``source`` is a word of ``caption`` (see :func:`words`)."""
    need = words(source)
    return bool(need) and need <= words(caption)


def related(a: str, b: str) -> bool:
    """True when one text's words contain the other's (``circle`` and ``red circle``)."""
    wa, wb = words(a), words(b)
    return wa <= wb or wb <= wa


def candidates(source: str, texts: Iterable[str], neutral: Sequence[str] = NEUTRAL) -> tuple[list[str], list[str]]:
    """The zero-shot classes of ``source`` among ``texts`` (the run's sources and targets and the
    CLIP's vocabulary): ``(positives, negatives)``. Positives: the source and every text holding all its
    words (``circle`` -> ``red circle``, ``blue circle``, ...); negatives: every text that is neither a
    word-subset nor a word-superset of it, then the neutral texts. A text that is a strict subset of the
    source (``red`` for ``red circle``) is neither: it says nothing either way."""
    mine = words(source)
    pool = [t for t in dict.fromkeys(texts) if t != source]
    positives = [source, *[t for t in pool if mine < words(t)]]
    negatives = [t for t in [*pool, *neutral] if not related(t, source)]
    return positives, list(dict.fromkeys(negatives))


@dataclass(frozen=True)
class Verdict:
    """Whether one sample matches one source: ``by`` is ``caption`` or ``clip``; ``confidence`` in
    [0, 1] (1 for a caption; the source's softmax probability for CLIP); ``caption`` the sample's."""

    match: bool
    by: str
    confidence: float
    caption: str | None = None

    def reason(self, source: str) -> str:
        """Why a sample that does not match was left out (one line, for a manifest row)."""
        if self.by == "caption":
            return f"not a {source!r} image by its caption {self.caption!r}"
        return f"not a {source!r} image by zero-shot CLIP (p={self.confidence:.2f})"


class SourceMatcher:
    """Decides, for a batch of samples, which of ``sources`` each matches (see the module docstring).
    ``clip``: a :class:`~dclip_ray.models.clip.ClipModel`, or a function returning one (called on the
    first uncaptioned sample: a captioned dataset never loads it); needed only for samples without a
    caption (None: such a sample matches every source, with confidence 0 and ``by="none"``);
    ``others``: more texts to compete with (the run's targets)."""

    def __init__(self, sources: Sequence[str], clip: Any = None, others: Sequence[str] = (),
                 neutral: Sequence[str] = NEUTRAL):
        self.sources = list(dict.fromkeys(sources))
        self._clip, self._loaded = clip, not callable(clip)
        self.others, self.neutral = list(others), tuple(neutral)
        self._classes: dict[str, tuple[list[str], list[str]]] | None = None
        self._text: dict[str, torch.Tensor] = {}

    @property
    def clip(self) -> Any:
        """The CLIP (loaded on first use when given as a function)."""
        if not self._loaded:
            self._clip, self._loaded = self._clip(), True
        return self._clip

    @property
    def classes(self) -> dict[str, tuple[list[str], list[str]]]:
        """Per source, its zero-shot ``(positives, negatives)`` (:func:`candidates`)."""
        if self._classes is None:
            texts = [*self.sources, *self.others, *(getattr(self.clip, "vocabulary", ()) or ())]
            self._classes = {s: candidates(s, texts, self.neutral) for s in self.sources}
        return self._classes

    def _text_embedding(self, text: str) -> torch.Tensor:
        if text not in self._text:
            self._text[text] = self.clip.text_embedding(text).float()
        return self._text[text]

    @torch.no_grad()
    def _clip_verdicts(self, x: torch.Tensor) -> list[dict[str, Verdict]]:
        """Zero-shot verdicts for images ``x`` [B,3,H,W] in [-1,1]."""
        img = self.clip.encode_image(x).float()
        scale = getattr(self.clip.model, "logit_scale", None)
        scale = float(scale.exp()) if scale is not None else 100.0
        out: list[dict[str, Verdict]] = [{} for _ in range(x.shape[0])]
        for s, (pos, neg) in self.classes.items():
            text = torch.stack([self._text_embedding(c) for c in [*pos, *neg]]).to(img.device)
            probs = (scale * img @ text.T).softmax(dim=-1)
            for i in range(x.shape[0]):
                p = probs[i]
                out[i][s] = Verdict(bool(int(p.argmax()) < len(pos)), "clip", round(float(p[: len(pos)].sum()), 4))
        return out

    def verdicts(self, items: Sequence[Decoded]) -> list[dict[str, Verdict]]:
        """``[{source: Verdict}]`` for decoded samples (``d.x`` [3,H,W] in [-1,1]; ``d.rec.extras`` for
        the caption). A sample that did not decode gets no verdicts (empty dict)."""
        out: list[dict[str, Verdict]] = [{} for _ in items]
        need_clip = []
        for i, d in enumerate(items):
            if d.x is None:
                continue
            cap = caption_of(d.rec.extras)
            if cap is not None:
                out[i] = {s: Verdict(caption_matches(cap, s), "caption", 1.0, cap) for s in self.sources}
            elif self.clip is None:
                out[i] = {s: Verdict(True, "none", 0.0) for s in self.sources}
            else:
                need_clip.append(i)
        if need_clip:
            x = torch.stack([items[i].x for i in need_clip])  # type: ignore[misc]
            for i, v in zip(need_clip, self._clip_verdicts(x), strict=True):
                out[i] = v
        return out


@dataclass
class TrainingSet:
    """The images chosen for one prompt: ``keys`` in input order, how many samples were looked at
    (``scanned``), by which judge (``by``: counts of ``caption``/``clip``) and the mean confidence."""

    name: str
    source: str
    wanted: int
    keys: list[str] = field(default_factory=list)
    by: dict[str, int] = field(default_factory=dict)
    confidence_sum: float = 0.0
    scanned: int = 0
    judged: list[tuple[str, float]] = field(default_factory=list)  # per key: (judge, confidence)

    @property
    def confidence(self) -> float | None:
        """Mean confidence of the chosen images (None when none was chosen)."""
        return round(self.confidence_sum / len(self.keys), 4) if self.keys else None

    def summary(self, first: int | None = None) -> dict[str, Any]:
        """The selection as reported per prompt (JSON-ready); ``first``: of the first that many keys only
        (the training images, when the rest are held aside)."""
        judged = self.judged[:first] if first is not None else self.judged
        by: dict[str, int] = {}
        for how, _ in judged:
            by[how] = by.get(how, 0) + 1
        conf = round(sum(c for _, c in judged) / len(judged), 4) if judged else None
        return {"matched": len(judged), "wanted": self.wanted if first is None else first, "scanned": self.scanned,
                "by": by, "confidence": conf}


def select_training_sets(prompts: Sequence[tuple[str, str, int]], shards: Sequence[str], size: int,
                         policy: str, matcher: SourceMatcher, batch_size: int = 32) -> dict[str, TrainingSet]:
    """Each prompt's training images: the first ``n`` samples (input order) that match its source.

    ``prompts``: ``(name, source, n)``; ``shards``: input shard paths in order. Streams the shards once,
    in batches, and stops as soon as every prompt has ``n`` images (one image may serve several
    prompts). Returns ``{name: TrainingSet}``; a prompt may end with fewer than it wanted (the caller
    decides whether that is an error)."""
    sets = {name: TrainingSet(name, source, n) for name, source, n in prompts}
    for path in shards:
        for batch in batched(iter(decode_shard(path, size, policy)), batch_size):
            good = [d for d in batch if d.x is not None]
            if not good:
                continue
            for ts in sets.values():
                if len(ts.keys) < ts.wanted:
                    ts.scanned += len(good)
            for d, v in zip(good, matcher.verdicts(good), strict=True):
                for ts in sets.values():
                    verdict = v.get(ts.source)
                    if len(ts.keys) < ts.wanted and verdict is not None and verdict.match:
                        ts.keys.append(d.rec.key)
                        ts.by[verdict.by] = ts.by.get(verdict.by, 0) + 1
                        ts.confidence_sum += verdict.confidence
                        ts.judged.append((verdict.by, verdict.confidence))
            if all(len(ts.keys) >= ts.wanted for ts in sets.values()):
                return sets
    return sets
