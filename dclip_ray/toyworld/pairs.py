"""The toy world's edit pairs and the held-out protocol the recipes are judged by (issue 20).

Every colour change on every shape (4 x 3 colours x 3 shapes = 36 pairs, recipe ``colour``) and every
shape change in every colour (3 x 2 shapes x 4 colours = 24 pairs, recipe ``shape``, or
``shape-upright`` to or from a triangle: :attr:`EditPair.recipe`) are split ONCE,
before any tuning, into a tuning set and an evaluation set: a seeded shuffle (:data:`SPLIT_SEED`) of
each kind, half and half, with the two pairs tuned before the split existed (red -> blue circle, red
circle -> red square) forced into the tuning set. Settings are tuned on :data:`TUNING` only; the
benchmark reports :data:`EVALUATION` (``python -m benchmarks --only recipes``). Never move a pair
between the sets after seeing its result.

An edit is judged by :func:`judge_edit` from pixels (never by CLIP): a colour edit succeeds when the
judge reads the target colour and the source shape; a shape edit when it reads the source colour and
the target shape. IoU is against the source mask (the outline kept: colour edits), and the
background error is over the pixels outside both the source and the judged mask.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .judge import judge, to_uint8_image
from .render import BACKGROUND, COLOURS, SHAPES

SPLIT_SEED = 20261202
"""The seed of the one split (fixed before tuning)."""


@dataclass(frozen=True)
class EditPair:
    """One toy edit: ``source`` -> ``target`` texts ("red circle" -> "blue circle"), its ``kind``
    ("colour" or "shape") and the changed attribute's values."""

    colour: str
    shape: str
    to: str
    kind: str

    @property
    def source(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def target(self) -> str:
        return f"{self.to} {self.shape}" if self.kind == "colour" else f"{self.colour} {self.to}"

    @property
    def target_colour(self) -> str:
        return self.to if self.kind == "colour" else self.colour

    @property
    def target_shape(self) -> str:
        return self.shape if self.kind == "colour" else self.to

    @property
    def recipe(self) -> str:
        """The recipe the toy model preset gives this edit when it names none
        (:func:`dclip_ray.config.preset_recipe`): ``colour`` for a colour change; ``shape-upright`` for a
        shape change to or from a triangle (it has an up and a down), else ``shape``."""
        from dclip_ray.config import preset_recipe
        from dclip_ray.models.presets import get_preset

        return str(preset_recipe(get_preset("toy_shapes"), self.source, self.target))

    @property
    def name(self) -> str:
        return f"{self.source.replace(' ', '_')}-to-{self.target.replace(' ', '_')}"


def all_pairs() -> list[EditPair]:
    """Every colour change on every shape, then every shape change in every colour."""
    colour = [EditPair(a, s, b, "colour") for s in SHAPES for a in COLOURS for b in COLOURS if a != b]
    shape = [EditPair(c, a, b, "shape") for c in COLOURS for a in SHAPES for b in SHAPES if a != b]
    return colour + shape


_TUNED_BEFORE = {("red", "circle", "blue", "colour"), ("red", "circle", "square", "shape")}


def _split() -> tuple[list[EditPair], list[EditPair]]:
    tuning, evaluation = [], []
    for kind in ("colour", "shape"):
        pairs = [p for p in all_pairs() if p.kind == kind]
        random.Random(f"{SPLIT_SEED}-{kind}").shuffle(pairs)
        forced = [p for p in pairs if (p.colour, p.shape, p.to, p.kind) in _TUNED_BEFORE]
        rest = [p for p in pairs if p not in forced]
        half = len(pairs) // 2 - len(forced)
        tuning += forced + rest[:half]
        evaluation += rest[half:]
    return tuning, evaluation


TUNING, EVALUATION = _split()
"""The tuning pairs (tune on these only) and the evaluation pairs (report these), fixed by :func:`_split`."""


def pair_by_name(name: str) -> EditPair:
    """The pair called ``name`` (:attr:`EditPair.name`, e.g. ``red_circle-to-blue_circle``)."""
    for p in all_pairs():
        if p.name == name:
            return p
    raise KeyError(name)


@dataclass(frozen=True)
class PairResult:
    """The judged edits of one pair: success rate in [0, 1], mean IoU against the source masks, mean
    background error in /255 units, how many images, and what the judge read (``"blue circle": 30``)."""

    success: float
    iou: float
    background: float
    n: int
    reads: dict[str, int]


def judge_edit(pair: EditPair, edits: np.ndarray, masks: np.ndarray) -> PairResult:
    """Judge ``edits`` (float [N,3,H,W] in [-1,1] or uint8 [N,H,W,3]) of ``pair``'s source images whose
    masks are ``masks`` (bool [N,H,W])."""
    ok, ious, bgs, reads = [], [], [], Counter()
    for image, mask in zip(edits, masks, strict=True):
        v = judge(image, ref_mask=mask)
        reads[f"{v.colour} {v.shape}"] += 1
        ok.append(v.success(pair.target_colour, pair.target_shape))
        ious.append(v.iou or 0.0)
        region = ~(mask | v.mask)
        diff = np.abs(to_uint8_image(image).astype(np.float32) - np.asarray(BACKGROUND, np.float32))
        bgs.append(float(diff[region].mean()) / 255 if region.any() else 0.0)
    return PairResult(float(np.mean(ok)), float(np.mean(ious)), float(np.mean(bgs)) * 255, len(ok),
                      dict(reads.most_common()))
