"""Training data of the toy world's tiny CLIP (:mod:`.train_clip`): captions, renders and augmentation.

- captions: the colour x shape phrases (:func:`class_phrases`), the hard negatives
  (:func:`hard_negative_phrases`: two-coloured shapes, blobs), the position phrases
  (:func:`position_phrases`, 3 x 3 grid) and the prompt :data:`TEMPLATES`;
- renders: two-coloured shapes (:func:`render_two_colour`), irregular blobs (:func:`blob_coverage`,
  :func:`render_blob`) and whole training batches (:func:`training_batch`);
- tensors: :func:`uint8_to_01`, :func:`augment` (shifts, blur, jitter, noise) and the CLIP input
  :func:`normalize`.

Every name here is re-exported by :mod:`dclip_ray.toyworld.train_clip`, the public import path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .judge import classify_shape, judge
from .render import BACKGROUND, COLOURS, SHAPES, SIZE, coverage, sample_params

TEMPLATES: tuple[str, ...] = (
    "a {}",
    "{}",
    "a photo of a {}.",
    "a picture of the {}",
    "an image of a {}.",
    "a rendering of a {}",
    "a {} on a grey background",
    "a drawing of a {}.",
)
"""Prompt templates drawn during training (the zero-shot evaluation uses ``"a {}"``)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def class_phrases() -> list[str]:
    """The colour x shape phrases, colour-major: ``["red circle", "red square", ...]``."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def hard_negative_phrases() -> list[str]:
    """Two-colour phrases (palette order, ``"red and blue circle"``) then blob phrases (``"red blob"``)."""
    names = list(COLOURS)
    pairs = [
        f"{a} and {b} {s}" for i, a in enumerate(names) for b in names[i + 1 :] for s in SHAPES
    ]
    return pairs + [f"{c} blob" for c in names]


POSITIONS: tuple[str, ...] = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the centre", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
"""Where a shape's centre lies on a 3 x 3 grid (row-major), for the position captions."""


def position_index(cx: float, cy: float, size: int = SIZE) -> int:
    """Index into :data:`POSITIONS` of a shape centred at ``(cx, cy)`` (pixels): the middle band is
    ``size/2 +- size/12`` wide on each axis (centres lie in about [8, 24] on a 32-pixel image)."""
    lo, hi = size / 2 - size / 12, size / 2 + size / 12
    col = 0 if cx < lo else (2 if cx > hi else 1)
    row = 0 if cy < lo else (2 if cy > hi else 1)
    return 3 * row + col


def position_phrases() -> list[str]:
    """Colour x shape x position phrases, ``"red circle in the top left"`` (class-major)."""
    return [f"{p} {pos}" for p in class_phrases() for pos in POSITIONS]


def all_phrases() -> list[str]:
    """Every phrase the model is trained on: class phrases first, then the hard negatives."""
    return class_phrases() + hard_negative_phrases()


def _background(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.7:
        return np.asarray(BACKGROUND, dtype=np.float32)
    grey = rng.uniform(90, 170)
    return (grey + rng.uniform(-8, 8, size=3)).astype(np.float32)


def render_two_colour(
    colour_a: str, colour_b: str, shape: str, rng: np.random.Generator, fraction: float | None = None
) -> np.ndarray:
    """A shape split by a random straight line into ``colour_a`` and ``colour_b``: uint8 ``[H,W,3]``.

    ``fraction`` (optional) fixes the line through the centre at a random angle (0.5 = half/half).
    """
    params = sample_params(rng)
    cov = coverage(shape, params)[..., None]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    theta = rng.uniform(0, 2 * np.pi)
    offset = 0.0 if fraction is not None else rng.uniform(-0.4, 0.4) * params.r
    side = ((xx - params.cx) * np.cos(theta) + (yy - params.cy) * np.sin(theta) - offset) > 0
    fg = np.where(side[..., None], np.asarray(COLOURS[colour_a], np.float32), np.asarray(COLOURS[colour_b], np.float32))
    bg = np.asarray(BACKGROUND, np.float32) if fraction is not None else _background(rng)
    return np.rint(cov * fg + (1 - cov) * bg).clip(0, 255).astype(np.uint8)


def blob_coverage(rng: np.random.Generator, max_tries: int = 20) -> np.ndarray:
    """Coverage float32 ``[H,W]`` of an irregular blob (union of 3-5 discs) whose shape features match
    no circle, square or triangle prototype of the judge (up to ``max_tries`` draws)."""
    sup = 4
    n = SIZE * sup
    coords = (np.arange(n, dtype=np.float32) + 0.5) / sup
    y, x = np.meshgrid(coords, coords, indexing="ij")
    red = np.asarray(COLOURS["red"], np.float32)
    bg = np.asarray(BACKGROUND, np.float32)
    cov = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(max_tries):
        cx, cy = rng.uniform(10, 22, size=2)
        inside = np.zeros((n, n), dtype=bool)
        for _ in range(int(rng.integers(3, 6))):
            r = rng.uniform(2.0, 5.0)
            px, py = cx + rng.uniform(-6, 6), cy + rng.uniform(-6, 6)
            inside |= (x - px) ** 2 + (y - py) ** 2 <= r * r
        cov = inside.reshape(SIZE, sup, SIZE, sup).mean(axis=(1, 3)).astype(np.float32)
        image = np.rint(cov[..., None] * red + (1 - cov[..., None]) * bg).astype(np.uint8)
        r = judge(image)
        if r.shape != "none" and classify_shape(r.fill_ratio, r.v_offset) == "blob":
            break
    return cov


def render_blob(colour: str, rng: np.random.Generator, cov: np.ndarray | None = None) -> np.ndarray:
    """A ``colour`` blob (``cov`` from :func:`blob_coverage`, drawn when None): uint8 ``[H,W,3]``."""
    cov = blob_coverage(rng) if cov is None else cov
    fg = np.asarray(COLOURS[colour], np.float32)
    return np.rint(cov[..., None] * fg + (1 - cov[..., None]) * _background(rng)).clip(0, 255).astype(np.uint8)


@dataclass
class CLIPTrainConfig:
    """Hyper-parameters of :func:`train_clip` (recorded in the model card)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    two_colour_fraction: float = 0.2
    blob_fraction: float = 0.2
    max_noise: float = 0.12
    blob_pool_size: int = 1500
    position_weight: float = 0.0
    init: str | None = None
    seed: int = 0
    threads: int = 2


def training_batch(
    rng: np.random.Generator,
    n: int,
    cfg: CLIPTrainConfig,
    phrases: list[str],
    blob_pool: list[np.ndarray] | None = None,
    positions: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` training images: ``(uint8 [n,H,W,3], caption index int64 [n])`` into ``phrases``.

    Blobs come from ``blob_pool`` (coverages, reused with a random flip/transpose) when given. When
    ``positions`` (int64 ``[n]``) is given it receives each single-colour shape's index into
    :func:`position_phrases` (-1 for two-colour shapes and blobs).
    """
    names = list(COLOURS)
    index = {p: i for i, p in enumerate(phrases)}
    class_index = {p: i for i, p in enumerate(class_phrases())}
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    targets = np.empty(n, dtype=np.int64)
    if positions is not None:
        positions[:] = -1
    for i in range(n):
        u = rng.random()
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if u < cfg.two_colour_fraction:
            a, b = sorted(rng.choice(len(names), size=2, replace=False))
            images[i] = render_two_colour(names[a], names[b], shape, rng)
            targets[i] = index[f"{names[a]} and {names[b]} {shape}"]
        elif u < cfg.two_colour_fraction + cfg.blob_fraction:
            colour = names[int(rng.integers(len(names)))]
            cov = None
            if blob_pool:
                cov = blob_pool[int(rng.integers(len(blob_pool)))]
                cov = np.rot90(cov, int(rng.integers(4))) if rng.random() < 0.5 else cov
            images[i] = render_blob(colour, rng, cov)
            targets[i] = index[f"{colour} blob"]
        else:
            colour = names[int(rng.integers(len(names)))]
            params = sample_params(rng)
            cov = coverage(shape, params)[..., None]
            fg = np.asarray(COLOURS[colour], np.float32)
            images[i] = np.rint(cov * fg + (1 - cov) * _background(rng)).clip(0, 255).astype(np.uint8)
            targets[i] = index[f"{colour} {shape}"]
            if positions is not None:
                positions[i] = class_index[f"{colour} {shape}"] * len(POSITIONS) + position_index(params.cx, params.cy)
    return images, targets


def augment(x: torch.Tensor, generator: torch.Generator, max_noise: float) -> torch.Tensor:
    """Random shifts (<= 2 px), blur, colour jitter and Gaussian noise: ``x`` ``[B,3,H,W]`` in [0,1]."""
    b = x.shape[0]
    shifts = torch.randint(-2, 3, (b, 2), generator=generator)
    x = torch.stack([torch.roll(x[i], (int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2)) for i in range(b)])
    blur = torch.rand(b, generator=generator) < 0.2
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k2 = (k[:, None] * k[None, :]) / 16.0
        weight = k2.expand(3, 1, 3, 3)
        blurred = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), weight, groups=3)
        x = x.clone()
        x[blur] = blurred
    jitter = (torch.rand(b, 1, 1, 1, generator=generator) < 0.5).float()
    gain = 1 + jitter * (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.16
    bias = jitter * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.1
    x = x * gain + bias
    noisy = (torch.rand(b, 1, 1, 1, generator=generator) < 0.5).float()
    sigma = noisy * torch.rand(b, 1, 1, 1, generator=generator) * max_noise
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """CLIP input normalisation of ``x01`` ``[B,3,H,W]`` in [0,1] (OpenAI mean/std, the config default)."""
    mean = torch.tensor(CLIP_MEAN, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def uint8_to_01(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B,H,W,3]`` -> float32 ``[B,3,H,W]`` in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
