"""Pictures for the HTML report (:mod:`.report`), drawn with PIL and no plotting library.

- :func:`image_grid`: labelled rows of images as one grid image;
- :func:`plot_curves`: a line chart (axes, ticks, legend, a moving average of a noisy first series);
- :func:`img_tag`: an ``<img>`` tag with the picture inlined as base64 PNG (the report refers to no URL);
- :func:`save_grid`: the before/after PNG grids the single-machine commands write (tensors, torchvision).

Everything here is re-exported by :mod:`dclip_ray.evaluation.report`, the public import path.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    import torch

CELL = 80  # pixels per image cell in grids

Colour = tuple[int, int, int]

_PALETTE: tuple[Colour, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
)
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 130, 28, 36  # chart margins (pixels)
_AXIS = (120, 120, 120)
_TICK_TEXT = (60, 60, 60)


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(img: Image.Image, alt: str) -> str:
    """An ``<img>`` tag showing ``img`` inlined as a base64 PNG ``data:`` URL, ``alt`` HTML-escaped."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png_b64(img)}" width="{img.width}">'


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def image_grid(rows: list[tuple[str, list[Image.Image]]], cell: int = CELL) -> Image.Image:
    """Rows of images (each row ``(label, [PIL images])``) as one labelled grid image; small images are
    enlarged with nearest-neighbour so 32x32 pixels stay visible."""
    label_w = 90
    ncols = max((len(r[1]) for r in rows), default=1) or 1
    pad = 4
    grid = Image.new("RGB", (label_w + ncols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, images) in enumerate(rows):
        y = pad + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label[:14], fill=(40, 40, 40), font=_font())
        for j, im in enumerate(images):
            im = im.convert("RGB")
            resample = Image.NEAREST if max(im.size) <= cell else Image.BICUBIC
            grid.paste(im.resize((cell, cell), resample), (label_w + pad + j * (cell + pad), y))
    return grid


# ---- line chart ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """The plot area of a chart in pixels (``left``, ``top``, width ``pw``, height ``ph``, image height
    ``h``) and the data range it shows (``x_lo..x_hi``, ``y_lo..y_hi``)."""

    left: int
    top: int
    pw: int
    ph: int
    h: int
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position of the data point ``(x, y)``."""
        return (self.left + (x - self.x_lo) / (self.x_hi - self.x_lo or 1) * self.pw,
                self.top + (1 - (y - self.y_lo) / (self.y_hi - self.y_lo)) * self.ph)


def _fit_frame(xs: list[float], values: list[float], size: tuple[int, int]) -> _Frame:
    w, h = size
    x_lo, x_hi = float(min(xs)), float(max(xs)) if len(xs) > 1 else float(min(xs)) + 1
    y_lo, y_hi = min(values), max(values)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    return _Frame(_LEFT, _TOP, w - _LEFT - _RIGHT, h - _TOP - _BOTTOM, h, x_lo, x_hi, y_lo, y_hi)


def _draw_axes(d: ImageDraw.ImageDraw, f: _Frame, font: ImageFont.ImageFont) -> None:
    left, top, pw, ph = f.left, f.top, f.pw, f.ph
    d.rectangle([left, top, left + pw, top + ph], outline=_AXIS)
    for k in range(5):
        yv = f.y_lo + (f.y_hi - f.y_lo) * k / 4
        _, yp = f.px(f.x_lo, yv)
        d.line([left - 4, yp, left, yp], fill=_AXIS)
        d.line([left + 1, yp, left + pw - 1, yp], fill=(235, 235, 235))
        d.text((4, yp - 6), f"{yv:.3g}", fill=_TICK_TEXT, font=font)
        xv = f.x_lo + (f.x_hi - f.x_lo) * k / 4
        xp, _ = f.px(xv, f.y_lo)
        d.line([xp, top + ph, xp, top + ph + 4], fill=_AXIS)
        d.text((xp - 10, top + ph + 8), f"{xv:.4g}", fill=_TICK_TEXT, font=font)
    d.text((left + pw // 2 - 10, f.h - 14), "step", fill=_TICK_TEXT, font=font)


def _moving_average(vals: list[float], win: int) -> np.ndarray:
    """Moving average (window ``win``, "valid" part: ``len(vals) - win + 1`` values) of ``vals`` with
    missing / non-finite values replaced by the mean of the finite ones."""
    arr = np.asarray([v if v is not None and math.isfinite(v) else np.nan for v in vals], dtype=float)
    kernel = np.ones(win) / win
    return np.convolve(np.nan_to_num(arr, nan=float(np.nanmean(arr))), kernel, mode="valid")


def _draw_series(d: ImageDraw.ImageDraw, f: _Frame, series: dict[str, list[float]], xs: list[float],
                 ) -> list[tuple[str, Colour]]:
    legend = []
    for idx, (name, vals) in enumerate(series.items()):
        colour = _PALETTE[idx % len(_PALETTE)]
        pts = [f.px(x, v) for x, v in zip(xs, vals, strict=False) if v is not None and math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=1 if len(pts) > 200 else 2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        legend.append((name, colour))
        if idx == 0 and len(vals) >= 20:  # a moving average makes the trend of a noisy per-step loss readable
            win = max(5, len(vals) // 20)
            smooth = _moving_average(vals, win)
            d.line([f.px(x, v) for x, v in zip(xs[win - 1:], smooth, strict=False)], fill=(0, 0, 0), width=2)
            legend.append((f"{name} (avg {win})", (0, 0, 0)))
    return legend


def _draw_legend(d: ImageDraw.ImageDraw, f: _Frame, legend: list[tuple[str, Colour]],
                 font: ImageFont.ImageFont) -> None:
    x0 = f.left + f.pw
    for i, (name, colour) in enumerate(legend):
        y = f.top + 4 + i * 16
        d.line([x0 + 10, y + 6, x0 + 28, y + 6], fill=colour, width=3)
        d.text((x0 + 32, y), name[:16], fill=(30, 30, 30), font=font)


def plot_curves(series: dict[str, list[float]], steps: list[float] | None = None, title: str = "",
                size: tuple[int, int] = (640, 300)) -> Image.Image:
    """A line chart of ``series`` (name -> values over ``steps``) drawn with PIL: axes, ticks, legend, and a
    moving average of the first series when it is noisy."""
    w, h = size
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    d.text((_LEFT, 8), title, fill=(0, 0, 0), font=font)
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not values:
        d.text((_LEFT, h // 2), "no finite values", fill=(150, 50, 50), font=font)
        return img
    n = max(len(s) for s in series.values())
    xs = steps if steps is not None and len(steps) == n else list(range(n))
    frame = _fit_frame(xs, values, size)
    _draw_axes(d, frame, font)
    _draw_legend(d, frame, _draw_series(d, frame, series, xs), font)
    return img


# ---- tensor grids ----------------------------------------------------------------------------------


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 4) -> Path:
    """Save image rows as one PNG grid: each row [N,3,H,W] in [-1,1] (e.g. before, reconstruction, after).

    ``scale`` enlarges small images (nearest neighbour) so a 32x32 toy image stays visible.
    """
    import torch  # lazily: the HTML report itself needs no torch
    from torchvision.utils import make_grid, save_image

    if not rows:
        raise ValueError("save_grid needs at least one row")
    n = rows[0].shape[0]
    x = torch.cat([r[:n].detach().float().cpu() for r in rows])
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid((x.clamp(-1, 1) + 1) / 2, nrow=n, padding=2, pad_value=1.0), path)
    return path
