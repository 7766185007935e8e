"""Toy-world images from outside the trained domain (paper Fig. 4): the inputs of `dclip-ray translate`
and `dclip-ray from-strokes`, rendered by `dclip-ray toyworld make-data --style photo|strokes`.

- :func:`photo`: a toy shape on a dark checkerboard the toy DDPM never saw (an "unseen domain");
- :func:`paint_strokes`: a rough colour-block painting (four thick blurred brush strokes with noise).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .render import BACKGROUND, COLOURS, SIZE, render


def photo(colour: str, shape: str, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 [size,size,3], mask bool [size,size])``: the shape on a dark grey background with a
    4-pixel checkerboard (+40 on alternate squares) outside the shape."""
    im, mask = render(colour, shape, seed=seed, size=size, background=(40, 40, 40))
    yy, xx = np.mgrid[:size, :size]
    checker = ((xx // 4 + yy // 4) % 2)[..., None] * 40.0
    return np.where(mask[..., None], im, np.clip(im + checker, 0, 255)).astype(np.uint8), mask


def paint_strokes(colour: str, seed: int, size: int = SIZE) -> np.ndarray:
    """A rough colour-block painting (uint8 [size,size,3]): 4 thick brush strokes of a jittered palette
    colour around a centre, blurred, with pixel noise."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    col = tuple(int(np.clip(v + rng.normal(0, 20), 0, 255)) for v in COLOURS[colour])
    cx, cy = rng.uniform(size * 12 / 32, size * 20 / 32, 2)
    for _ in range(4):
        a, length = rng.uniform(0, np.pi), rng.uniform(4, 8)
        ox, oy = rng.normal(0, 2.5, 2)
        draw.line([cx + ox - length * np.cos(a), cy + oy - length * np.sin(a),
                   cx + ox + length * np.cos(a), cy + oy + length * np.sin(a)], fill=col, width=int(rng.integers(3, 6)))
    arr = np.asarray(im.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)
