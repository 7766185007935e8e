"""Deterministic renderer of the toy world: one coloured shape on a plain grey background.

Every image is a pure function of ``(colour, shape, ShapeParams)``; :func:`sample_params` draws the
position and size jitter from a seeded generator, so ``render(colour, shape, seed=s)`` returns the
same pixels on every machine. Shapes are rendered with 4x4 supersampling (anti-aliased edges); the
mask marks the pixels the shape covers by at least half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dclip_ray.errors import ConfigError

SIZE = 32
"""Default image side in pixels."""

BACKGROUND: tuple[int, int, int] = (128, 128, 128)
"""The plain background colour (uint8 RGB)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
}
"""The palette: colour name -> uint8 RGB."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""The shape names."""

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeParams:
    """Geometry of one shape in pixel units: centre ``(cx, cy)`` and half-extent ``r``.

    A circle has radius ``r``; a square has side ``2r``; a triangle is the upright equilateral
    triangle inscribed in the circle of radius ``1.15 r`` around the centre (so the three shapes have
    a similar visual size).
    """

    cx: float
    cy: float
    r: float


def caption(colour: str, shape: str) -> str:
    """The caption of one image, e.g. ``"a red circle"``."""
    return f"a {colour} {shape}"


def _check(colour: str, shape: str) -> None:
    if colour not in COLOURS:
        raise ConfigError(f"unknown toy-world colour {colour!r}: use one of {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ConfigError(f"unknown toy-world shape {shape!r}: use one of {', '.join(SHAPES)}")


def sample_params(rng: np.random.Generator, size: int = SIZE) -> ShapeParams:
    """Draw position and size jitter: ``r`` in [0.19, 0.31] * size, centre keeps a 2-pixel margin."""
    r = float(rng.uniform(0.19, 0.31) * size)
    lo, hi = r + 2.0, size - r - 2.0
    cx = float(rng.uniform(lo, hi))
    cy = float(rng.uniform(lo, hi))
    return ShapeParams(cx=cx, cy=cy, r=r)


def coverage(shape: str, params: ShapeParams, size: int = SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32 ``[size, size]`` in [0, 1]."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown toy-world shape {shape!r}: use one of {', '.join(SHAPES)}")
    n = size * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - params.cx, y - params.cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= params.r * params.r
    elif shape == "square":
        inside = (np.abs(dx) <= params.r) & (np.abs(dy) <= params.r)
    else:  # upright equilateral triangle, circumradius R (apex up: smaller y)
        big_r = 1.15 * params.r
        half_w = big_r * np.sqrt(3.0) / 2.0
        top, bottom = -big_r, big_r / 2.0
        # inside when below the apex-to-corner edges and above the base
        frac = (dy - top) / (bottom - top)  # 0 at apex, 1 at base
        inside = (dy <= bottom) & (frac >= 0) & (np.abs(dx) <= frac * half_w)
    cov = inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    return cov.astype(np.float32)


def render(
    colour: str,
    shape: str,
    seed: int | None = None,
    *,
    params: ShapeParams | None = None,
    size: int = SIZE,
    background: tuple[int, int, int] = BACKGROUND,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image: ``(image uint8 [size,size,3], mask bool [size,size])``.

    The geometry is ``params`` when given, else drawn by :func:`sample_params` from
    ``numpy.random.default_rng(seed)`` (``seed`` defaults to 0), so equal arguments give equal pixels.
    """
    _check(colour, shape)
    if params is None:
        params = sample_params(np.random.default_rng(0 if seed is None else seed), size)
    cov = coverage(shape, params, size)[..., None]
    fg = np.asarray(COLOURS[colour], dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    image = np.rint(cov * fg + (1.0 - cov) * bg).clip(0, 255).astype(np.uint8)
    return image, cov[..., 0] >= 0.5


@dataclass(frozen=True)
class Sample:
    """One rendered example: image uint8 ``[H,W,3]``, mask bool ``[H,W]``, labels, caption, key."""

    image: np.ndarray
    mask: np.ndarray
    colour: str
    shape: str
    caption: str
    key: str
    seed: int
    params: ShapeParams


def sample_dataset(
    n: int,
    seed: int,
    colours: list[str] | tuple[str, ...] | None = None,
    shapes: list[str] | tuple[str, ...] | None = None,
    size: int = SIZE,
    kinds: list[tuple[str, str]] | None = None,
) -> list[Sample]:
    """Render ``n`` examples from ``seed``: balanced colour x shape classes, geometry jittered.

    ``kinds``: exactly these (colour, shape) classes, interleaved in this order (instead of the cross
    product of ``colours`` and ``shapes``).

    Example ``i`` has class ``i mod (#colours * #shapes)`` (colour-major) and geometry drawn from
    ``default_rng([seed, i])``, so a prefix of a larger dataset equals the smaller one. Keys are
    ``"{seed}_{i:06d}"`` (no dots: WebDataset splits extensions at the first dot).
    """
    if n < 0:
        raise ConfigError(f"sample_dataset: n must be >= 0, got {n}")
    colours = list(COLOURS) if colours is None else list(colours)
    shapes = list(SHAPES) if shapes is None else list(shapes)
    if not colours or not shapes:
        raise ConfigError("sample_dataset: colours and shapes must not be empty")
    for c in colours:
        _check(c, shapes[0])
    for s in shapes:
        _check(colours[0], s)
    classes = [(c, s) for c in colours for s in shapes]
    if kinds is not None:
        if not kinds:
            raise ConfigError("sample_dataset: kinds must not be empty")
        for c, s in kinds:
            _check(c, s)
        classes = list(kinds)
    out = []
    for i in range(n):
        colour, shape = classes[i % len(classes)]
        params = sample_params(np.random.default_rng([seed, i]), size)
        image, mask = render(colour, shape, params=params, size=size)
        out.append(
            Sample(image, mask, colour, shape, caption(colour, shape), f"{seed}_{i:06d}", seed, params)
        )
    return out


def random_batch(
    rng: np.random.Generator, n: int, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Render ``n`` random examples for training: ``(images uint8 [n,H,W,3], masks bool [n,H,W],
    colours, shapes)`` with classes drawn uniformly from ``rng``."""
    colours = list(COLOURS)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    cs, ss = [], []
    for i in range(n):
        c = colours[int(rng.integers(len(colours)))]
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        images[i], masks[i] = render(c, s, params=sample_params(rng, size), size=size)
        cs.append(c)
        ss.append(s)
    return images, masks, cs, ss
