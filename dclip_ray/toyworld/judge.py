"""The toy world's judge: reads the foreground's colour and shape from pixels (no learned network).

It exists so an edit can be scored without trusting the CLIP it was trained against. Steps:

1. background colour = median of the 1-pixel image border (shapes keep a 2-pixel margin);
2. foreground colour = median of the pixels far (> 40/255 in RGB distance) from the background;
   mask = pixels at least half-way from the background towards that colour (the renderer's mask is
   "coverage >= 0.5", so on rendered images both agree up to rounding);
3. colour = nearest palette colour to the median of the mask's core pixels ("other" when none is
   within ``max_colour_distance``);
4. shape = from the largest 4-connected component of the mask: the fill ratio of its bounding box
   (square ~1.0, circle ~0.78, triangle ~0.56 at these sizes) and the vertical offset of its centroid from the box
   centre (a triangle's mass sits low); a component matching no prototype, or touching the image
   border (rendered shapes keep a 2-pixel margin), is a "blob";
5. IoU of the mask against a reference mask, and the background's mean absolute error / 255
   outside the reference mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .render import BACKGROUND, COLOURS, SHAPES

_ROUGH_THRESHOLD = 40.0
_MIN_PIXELS = 6

# Shape prototypes in (fill ratio, 2 * vertical centroid offset / box height) space.
# Measured on 1,200 renders: circle fill 0.70-0.86, |v| < 0.07; square fill >= 0.98; triangle fill
# 0.50-0.64, v 0.25-0.33 (small triangles fill their pixel box more than the ideal 0.5).
_PROTOTYPES = {"square": (1.0, 0.0), "circle": (0.78, 0.0), "triangle": (0.56, 0.30)}
_MAX_SHAPE_DISTANCE = 0.2


@dataclass
class JudgeResult:
    """What the judge read from one image.

    ``colour``: palette name, "other" (far from every palette colour) or "none" (no foreground);
    ``shape``: one of ``SHAPES``, "blob" (no prototype fits) or "none"; ``mask``: bool ``[H,W]``
    foreground; ``iou``: against the reference mask (None without one); ``bg_error``: mean absolute
    error / 255 over the background region (outside the reference mask, else outside ``mask``)
    against the reference image (else the plain ``BACKGROUND`` colour); ``colour_purity``: fraction
    of mask pixels whose nearest palette colour is ``colour``; ``colour_distance``: RGB distance of
    the foreground median to that palette colour; ``fill_ratio`` and ``v_offset``: shape features.
    """

    colour: str
    shape: str
    mask: np.ndarray = field(repr=False)
    iou: float | None
    bg_error: float
    colour_purity: float
    colour_distance: float
    fill_ratio: float
    v_offset: float
    fg_pixels: int

    def matches(self, colour: str | None = None, shape: str | None = None) -> bool:
        """True when the judged colour and/or shape equal the given ones (None = not checked)."""
        return (colour is None or self.colour == colour) and (shape is None or self.shape == shape)

    def success(self, colour: str | None = None, shape: str | None = None) -> bool:
        """The one success rule of the toy world (eval, ``toyworld judge``, the tests, the report): the
        image shows one toy shape (not a blob, not empty) whose colour is named a palette colour (its
        median within the judge's ``max_colour_distance`` of it, 100 RGB units by default: edited colours
        sit 50-65 units from the palette, so a stricter rule would fail every good colour edit), and that
        colour / shape are the given ones (None = not checked)."""
        return self.shape in SHAPES and self.colour in COLOURS and self.matches(colour, shape)


def to_uint8_image(image: Any) -> np.ndarray:
    """Accept uint8 ``[H,W,3]`` (numpy) or a float tensor/array ``[3,H,W]`` in [-1,1]; return uint8 ``[H,W,3]``."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"judge: expected a uint8 image [H,W,3], got shape {arr.shape}")
        return arr
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"judge: expected a float image [3,H,W] in [-1,1], got shape {arr.shape}")
    return np.rint((arr.transpose(1, 2, 0) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (flood fill; images are tiny)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = current
                    stack.append((yy, xx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask)


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """``(fill_ratio, v_offset)`` of a bool mask: area / bounding-box area, and the centroid's
    offset below the box centre as a fraction of half the box height (0 for symmetric shapes,
    1/3 for an upright triangle)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0, 0.0
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    fill = len(ys) / float(h * w)
    v_offset = (ys.mean() - (y0 + y1) / 2.0) / (h / 2.0)
    return float(fill), float(v_offset)


def classify_shape(fill: float, v_offset: float) -> str:
    """Nearest shape prototype in (fill, 2 * v_offset) space, or "blob" when none is close."""
    best, best_d = "blob", _MAX_SHAPE_DISTANCE
    for name, (f, v) in _PROTOTYPES.items():
        d = float(np.hypot(fill - f, 2.0 * v_offset - 2.0 * v))
        if d < best_d:
            best, best_d = name, d
    return best


def _background_colour(img: np.ndarray) -> np.ndarray:
    """float32 ``[3]`` in [0,255]: per-channel median of the 1-pixel border of ``img`` (float32
    ``[H,W,3]`` in [0,255])."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def _read_colour(
    img: np.ndarray, dist: np.ndarray, bg: np.ndarray, rough: np.ndarray, max_colour_distance: float
) -> tuple[np.ndarray, str, float, float]:
    """Steps 2-3 on ``img`` (float32 ``[H,W,3]`` in [0,255]) given ``dist`` (float ``[H,W]``, RGB
    distance to the background ``bg`` ``[3]``) and ``rough`` (bool ``[H,W]``, ``dist`` above the
    rough threshold, >= ``_MIN_PIXELS`` set). Returns ``(mask, colour, purity, colour_distance)``:
    bool ``[H,W]`` foreground, palette name or "other", fraction in [0,1], RGB distance."""
    fg = np.median(img[rough], axis=0)
    contrast = float(np.linalg.norm(fg - bg))
    mask = dist >= 0.5 * max(contrast, _ROUGH_THRESHOLD)
    core = dist >= 0.75 * contrast
    fg_core = np.median(img[core if core.sum() >= _MIN_PIXELS else mask], axis=0)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[c] for c in names], dtype=np.float32)
    d_palette = np.linalg.norm(fg_core[None] - palette, axis=-1)
    k = int(d_palette.argmin())
    cdist = float(d_palette[k])
    colour = names[k] if cdist <= max_colour_distance else "other"
    nearest = np.linalg.norm(img[mask][:, None] - palette[None], axis=-1).argmin(-1)
    purity = float((nearest == k).mean()) if mask.any() else 0.0
    return mask, colour, purity, cdist


def _read_shape(mask: np.ndarray) -> tuple[str, float, float]:
    """Step 4 on a bool ``[H,W]`` foreground mask: ``(shape, fill_ratio, v_offset)`` of its largest
    4-connected component ("none" when under ``_MIN_PIXELS``, "blob" when it touches the border)."""
    component = _largest_component(mask)
    fill, v_off = shape_features(component)
    touches_border = bool(component[0].any() or component[-1].any() or component[:, 0].any() or component[:, -1].any())
    if component.sum() < _MIN_PIXELS:
        shape = "none"
    elif touches_border:  # rendered shapes keep a 2-pixel margin: this is noise or a smear
        shape = "blob"
    else:
        shape = classify_shape(fill, v_off)
    return shape, fill, v_off


def _iou(mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Intersection over union in [0,1] of two bool ``[H,W]`` masks (1.0 when both are empty)."""
    union = np.logical_or(mask, ref_mask).sum()
    return float(np.logical_and(mask, ref_mask).sum() / union) if union else 1.0


def _background_error(img: np.ndarray, region: np.ndarray, ref_image: np.ndarray | None) -> float:
    """Mean absolute error / 255 (in [0,1]) of ``img`` (float32 ``[H,W,3]`` in [0,255]) against
    ``ref_image`` (uint8 ``[H,W,3]``, default the plain ``BACKGROUND``) over the bool ``[H,W]``
    ``region``; 0.0 for an empty region."""
    ref = (
        np.asarray(ref_image, dtype=np.float32)
        if ref_image is not None
        else np.broadcast_to(np.asarray(BACKGROUND, dtype=np.float32), img.shape)
    )
    return float(np.abs(img - ref)[region].mean() / 255.0) if region.any() else 0.0


def judge(
    image: Any,
    ref_mask: np.ndarray | None = None,
    ref_image: np.ndarray | None = None,
    max_colour_distance: float = 100.0,
) -> JudgeResult:
    """Judge one image: uint8 ``[H,W,3]`` or float ``[3,H,W]`` in [-1,1] (numpy or torch).

    ``ref_mask``: bool ``[H,W]`` mask of the original shape (for IoU and the background region);
    ``ref_image``: uint8 ``[H,W,3]`` the background is compared to (default: the plain background).
    """
    img = to_uint8_image(image).astype(np.float32)
    h, w, _ = img.shape
    bg = _background_colour(img)
    dist = np.linalg.norm(img - bg, axis=-1)
    rough = dist > _ROUGH_THRESHOLD
    if rough.sum() < _MIN_PIXELS:
        mask = np.zeros((h, w), dtype=bool)
        colour, shape, purity, cdist, fill, v_off = "none", "none", 0.0, 0.0, 0.0, 0.0
    else:
        mask, colour, purity, cdist = _read_colour(img, dist, bg, rough, max_colour_distance)
        shape, fill, v_off = _read_shape(mask)
    iou = None
    if ref_mask is not None:
        ref_mask = np.asarray(ref_mask, dtype=bool)
        iou = _iou(mask, ref_mask)
    region = ~(ref_mask if ref_mask is not None else mask)
    return JudgeResult(
        colour=colour,
        shape=shape,
        mask=mask,
        iou=iou,
        bg_error=_background_error(img, region, ref_image),
        colour_purity=purity,
        colour_distance=cdist,
        fill_ratio=fill,
        v_offset=v_off,
        fg_pixels=int(mask.sum()),
    )


def judge_batch(
    images: Any,
    ref_masks: np.ndarray | None = None,
    ref_images: np.ndarray | None = None,
) -> list[JudgeResult]:
    """Judge a batch: uint8 ``[B,H,W,3]`` or float ``[B,3,H,W]`` in [-1,1]; optional reference
    masks bool ``[B,H,W]`` and images uint8 ``[B,H,W,3]``."""
    return [
        judge(
            images[i],
            None if ref_masks is None else ref_masks[i],
            None if ref_images is None else ref_images[i],
        )
        for i in range(len(images))
    ]
