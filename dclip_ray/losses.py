"""DiffusionCLIP losses: directional and global CLIP (eq. 8-9), L1, face identity (eq. 10-11).

A CLIP argument is anything with ``encode_image(x [B,3,H,W] in [-1,1]) -> [B,D]`` (L2-normalised),
``text_embedding(prompt) -> [D]`` and ``text_direction(source, target) -> [D]`` (see
:mod:`dclip_ray.models.clip`), or an ensemble exposing ``members: list[(clip, weight)]``; an ensemble's
loss is the weight-averaged loss of its members.

Adversarial solutions: a small CLIP (and a big one, less often) can be satisfied by pixel patterns a
person would not call an edit. Encoding several augmented views (random shifts, Gaussian noise, and
optionally blur and flips) of the image pair and averaging the loss over them makes such patterns much
harder to find; the default is 4 views, up to 3 px shifts and noise 0.1. Flips matter for geometric
edits: without them the toy CLIP's circle -> square direction is met by squaring only the top corners
(the feature that tells a square from a triangle); with up-down flips every corner has to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dclip_ray.errors import ConfigError
from dclip_ray.scoring import frame_mask

DirectionForm = Literal["cosine", "log"]


def clip_members(clip: Any) -> list[tuple[Any, float]]:
    """``[(clip_model, weight), ...]`` of an ensemble, or ``[(clip, 1.0)]`` for a single model."""
    members = getattr(clip, "members", None)
    if members is None:
        return [(clip, 1.0)]
    members = [(m, float(w)) for m, w in members]
    if not members or sum(w for _, w in members) <= 0:
        raise ConfigError("a CLIP ensemble needs at least one member with a positive weight")
    return members


@dataclass(frozen=True)
class Augment:
    """Paired random views of ``(x_gen, x_ref)``: the same integer shift, the same Gaussian blur
    (sigma uniform in [0, ``max_blur``] pixels; 0 disables it), the same random flips (``flip``: ""
    none, "h" left-right, "hv" left-right and up-down, each with probability 1/2) and the same noise
    on both.

    ``n_views = 0`` disables augmentation (the official code's behaviour).
    """

    n_views: int = 4
    max_shift: int = 3
    noise_std: float = 0.1
    max_blur: float = 0.0
    flip: str = ""

    def __post_init__(self) -> None:
        if self.flip not in ("", "h", "hv"):
            raise ConfigError(f"augmentation flip={self.flip!r}: expected '' (none), 'h' or 'hv'")

    def views(
        self, x_gen: torch.Tensor, x_ref: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n_views`` pairs of [B,3,H,W] tensors (or the unaugmented pair when disabled)."""
        if self.n_views <= 0:
            return [(x_gen, x_ref)]
        out = []
        p = self.max_shift
        for _ in range(self.n_views):
            dx, dy = (torch.randint(-p, p + 1, (2,), generator=generator).tolist() if p > 0 else (0, 0))
            noise = torch.randn(x_gen.shape, generator=generator).to(x_gen) * self.noise_std
            sigma = float(torch.rand((), generator=generator)) * self.max_blur if self.max_blur > 0 else 0.0
            dims = []
            if self.flip:
                coins = torch.rand((len(self.flip),), generator=generator).tolist()
                dims = [d for d, c in zip((-1, -2), coins, strict=False) if c < 0.5]
            pair = []
            for x in (x_gen, x_ref):
                if p > 0:
                    x = F.pad(x, (p, p, p, p), mode="replicate")
                    h, w = x.shape[-2] - 2 * p, x.shape[-1] - 2 * p
                    x = x[..., p + dy : p + dy + h, p + dx : p + dx + w]
                if sigma > 0.05:
                    x = gaussian_blur(x, sigma)
                if dims:
                    x = torch.flip(x, dims)
                pair.append(x + noise)
            out.append((pair[0], pair[1]))
        return out


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``x`` [B,C,H,W] (any range) with std ``sigma`` pixels (torchvision, reflected
    edges, kernel +-3 sigma); differentiable in ``x``."""
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

    size = 2 * max(1, int(3.0 * sigma + 0.5)) + 1
    return tv_blur(x, [size, size], [sigma, sigma])


def directional_clip_loss(
    clip: Any,
    x_gen: torch.Tensor,
    x_ref: torch.Tensor,
    source: str,
    target: str,
    form: DirectionForm = "log",
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Directional CLIP loss (eq. 9) per image: [B], differentiable in ``x_gen``.

    ``x_gen``, ``x_ref``: [B,3,H,W] in [-1,1]. With ``cos = cos(E_I(x_gen) - E_I(x_ref), dT)`` and the
    template-averaged text direction ``dT = text_direction(source, target)``: ``form="cosine"`` gives
    ``1 - cos`` in [0, 2]; ``form="log"`` (the official training form) gives ``-log((1 + cos) / 2)`` >= 0.
    The loss is averaged over augmented views and over ensemble members (by weight).
    """
    if form not in ("cosine", "log"):
        raise ConfigError(f"form={form!r}: expected 'cosine' or 'log'")
    views = (augment or Augment(n_views=0)).views(x_gen, x_ref, generator)
    total, weight_sum = 0.0, 0.0
    for model, w in clip_members(clip):
        text_dir = model.text_direction(source, target).to(x_gen.device)
        # all views in one forward pass per side: [V*B,3,H,W] (view-major)
        with torch.no_grad():
            e_ref = model.encode_image(torch.cat([r for _, r in views]))
        d_img = model.encode_image(torch.cat([g for g, _ in views])) - e_ref
        d_img = d_img / (d_img.norm(dim=-1, keepdim=True) + 1e-7)
        cos = (d_img * text_dir.to(d_img.dtype)).sum(-1).view(len(views), x_gen.shape[0])
        per_view = 1.0 - cos if form == "cosine" else -torch.log(((1.0 + cos) / 2.0).clamp_min(1e-7))
        total = total + w * per_view.mean(0)
        weight_sum += w
    return total / weight_sum


def global_clip_loss(clip: Any, x_gen: torch.Tensor, target: str) -> torch.Tensor:
    """Global CLIP loss (eq. 8) per image: ``1 - cos(E_I(x_gen), E_T(target))``, [B] in [0, 2].

    ``x_gen``: [B,3,H,W] in [-1,1]; the text embedding is averaged over the prompt templates.
    """
    total, weight_sum = 0.0, 0.0
    for model, w in clip_members(clip):
        e_t = model.text_embedding(target).to(x_gen.device)
        total = total + w * (1.0 - (model.encode_image(x_gen) * e_t.to(x_gen.dtype)).sum(-1))
        weight_sum += w
    return total / weight_sum


def l1_loss(x_gen: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image, [B]; inputs [B,C,H,W] in [-1,1]."""
    return (x_gen - x0).abs().flatten(1).mean(1)


def frame_l1_loss(x_gen: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image, [B], over the outer frame only (:func:`dclip_ray.scoring.frame_mask`:
    1/8 of the side on each edge); inputs [B,C,H,W] in [-1,1].

    Ours: charges a change of the background directly, where an object-centred image has it (the
    score's ``background`` term measures the same band). Plain L1 charges a tinted background no more
    per pixel than the recoloured object, so an edit can meet the CLIP direction by tinting the whole
    picture; this term makes that the expensive way. Leave it at 0 for edits that should change the
    whole picture (a style, a scene's light).
    """
    m = frame_mask(*x_gen.shape[-2:], device=x_gen.device)
    return (x_gen - x0).abs().mean(1)[:, m].mean(1)


def edge_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel colour-gradient magnitude ``sqrt(sum_c dx^2 + dy^2)`` of ``x`` [B,C,H,W] (forward
    differences, zero at the last row/column): [B,H,W] >= 0. Where the edges are, not their colours."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return (dx.pow(2) + dy.pow(2)).sum(1).add(1e-6).sqrt()


def edge_loss(x_gen: torch.Tensor, x0: torch.Tensor, scales: int = 1, contrast: bool = False) -> torch.Tensor:
    """Edge-structure loss per image, [B]: mean ``|edge_magnitude(x_gen) - edge_magnitude(x0)|``;
    inputs [B,3,H,W] in [-1,1]. ``scales`` > 1 averages this over the images and their 2x2, 4x4, ...
    average-pooled copies (``scales`` levels in all): a misplaced outline then costs more than the one or
    two pixels where the fine edges differ, so it is pulled back from further away.

    Our addition to eq. 10 (not in the paper): L1 to the input penalises every recoloured pixel, so
    with a CLIP that is indifferent to size the cheapest recolouring is a smaller object (toy world:
    a disc 2 px smaller lowers L1 by 14 % at the same CLIP loss). Edge magnitudes ignore what colour
    an edge has but not where it is: a recolour in place costs 0.008, the same disc 1-2 px smaller
    0.08-0.11. It opposes shape edits just as much, so leave it at 0 for those.

    ``contrast``: compare edges up to their overall strength. An edge's magnitude is the colour contrast
    across it, so a recolour in place changes it too (toy world: a blue disc on grey has contrast 136/255,
    a yellow one 164/255, +20 % on every outline pixel), and the absolute loss charges the new colour
    for that. With ``contrast`` each image's edge map (per scale) is first scaled to the input's mean
    edge strength: a recolour in place costs 0 whatever its contrast, a moved or rounded outline as before.
    """
    if scales < 1:
        raise ConfigError(f"edge scales={scales} must be >= 1")
    total = x_gen.new_zeros(x_gen.shape[0])
    for level in range(scales):
        a, b = (x_gen, x0) if level == 0 else (F.avg_pool2d(x_gen, 2**level), F.avg_pool2d(x0, 2**level))
        ea, eb = edge_magnitude(a).flatten(1), edge_magnitude(b).flatten(1)
        if contrast:
            ea = ea * (eb.mean(1, keepdim=True) / ea.mean(1, keepdim=True).clamp_min(1e-6))
        total = total + (ea - eb).abs().mean(1)
    return total / scales


def layout_distances(x: torch.Tensor, grid: int = 32) -> torch.Tensor:
    """The colour-distance self-similarity of ``x`` [B,3,H,W] in [-1,1]: the image average-pooled to at
    most ``grid`` x ``grid`` pixels (N of them), then ``D[i, j] = |c_i - c_j|`` for every pair of pixel
    colours, divided by its mean over the image: [B,N,N] >= 0 with mean 1 (all 1 for a one-colour image,
    whose distances are all the 1e-4 floor: two one-colour images have the same layout).

    What lies where, not which colours it has: recolouring one region of a two-colour picture (and
    any anti-aliased blend between the two) scales every distance alike, so the normalised map is
    unchanged; moving, growing or rounding the region moves whole rows of it.
    """
    c = _pooled_pixels(x, grid)
    d = _squared_distances(c, c).add(1e-8).sqrt()
    return d / d.flatten(1).mean(1).clamp_min(1e-4).view(-1, 1, 1)


def layout_loss(x_gen: torch.Tensor, x0: torch.Tensor, grid: int = 32) -> torch.Tensor:
    """Layout loss per image, [B]: mean ``|layout_distances(x_gen) - layout_distances(x0)|`` (inputs
    [B,3,H,W] in [-1,1]; compared on at most ``grid`` x ``grid`` pixels).

    Ours, after the self-similarity structure losses of Splice (Tumanyan et al. 2022) and DiffuseIT (Kwon
    & Ye 2023), which compare ViT-key self-similarities; here the "features" are the pixel colours, so
    the term needs no network. A recolour in place costs ~0 whatever the new colour (plain L1 and the
    edge loss both charge it), a rounded corner or a moved outline costs every pixel that changed sides.
    Blind to a uniform tint of one region (L1 or ``frame`` charge that). It opposes shape edits; leave it
    at 0 for those.
    """
    with torch.no_grad():
        ref = layout_distances(x0, grid)
    return (layout_distances(x_gen, grid) - ref).abs().flatten(1).mean(1)


def palette_loss(x_gen: torch.Tensor, x0: torch.Tensor, grid: int = 32) -> torch.Tensor:
    """Palette loss per image, [B]: the mean over the pixels of ``x_gen`` of the RGB distance to the
    NEAREST pixel colour of ``x0`` (a one-sided chamfer distance in colour space; inputs [B,3,H,W] in
    [-1,1], both average-pooled to at most ``grid`` x ``grid`` pixels first).

    Ours, the counterpart of :func:`layout_loss` for shape edits: it keeps which colours the picture has
    and ignores where they are, so a circle grown into a square in its own colour costs ~0 (the new
    pixels have a colour the input has) while a drift to another colour or a tinted background costs
    every pixel that left the input's palette. L1 charges the shape change itself, and less for a colour
    near the old one, which is how a shape edit drifts into a near colour. It opposes colour edits;
    leave it at 0 for those.
    """
    sq = _squared_distances(_pooled_pixels(x_gen, grid), _pooled_pixels(x0, grid).detach())
    return sq.min(2).values.add(1e-8).sqrt().mean(1)


def _pooled_pixels(x: torch.Tensor, grid: int) -> torch.Tensor:
    """The pixel colours of ``x`` [B,3,H,W] average-pooled to at most ``grid`` x ``grid``: [B,N,3]."""
    if grid < 1:
        raise ConfigError(f"layout/palette grid={grid} must be >= 1")
    k = max(1, -(-max(x.shape[-2:]) // grid))
    if k > 1:
        x = F.avg_pool2d(x, k, ceil_mode=True)
    return x.flatten(2).transpose(1, 2)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_i - b_j|^2`` for colours ``a`` [B,N,3] and ``b`` [B,M,3]: [B,N,M] >= 0, computed as ``|a|^2 +
    |b|^2 - 2ab`` (no [B,N,M,3] tensor: 3.5x faster on 32 x 32 toy images)."""
    na, nb = a.pow(2).sum(-1), b.pow(2).sum(-1)
    return (na.unsqueeze(2) + nb.unsqueeze(1) - 2 * a @ b.transpose(1, 2)).clamp_min(0)


def identity_loss(face: Any, x_gen: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Face identity loss per image, [B]: ``1 - <f(x_gen), f(x0)>`` with ``f`` a normalised face embedding.

    ``face.embed(x [B,3,H,W] in [-1,1]) -> [B,512]``; the reference embedding is detached, the gradient
    reaches ``x_gen`` (the official efficient mode lost it by embedding a detached tensor).
    """
    with torch.no_grad():
        ref = face.embed(x0)
    return 1.0 - (face.embed(x_gen) * ref).sum(-1)


@dataclass
class EditLoss:
    """The fine-tuning objective (eq. 10-11): ``w_clip * L_direction + w_l1 * L1 + w_id * L_face``, plus
    the optional global CLIP loss (eq. 8, ``w_global``) and four terms of ours: edge structure
    (``w_edge``), frame L1 (``w_frame``: the background's change), layout (``w_layout``: where things are,
    whatever their colours) and palette (``w_palette``: which colours, wherever they are).

    Call with ``(x_gen, x0)`` ([B,3,H,W] in [-1,1]) to get ``(loss scalar, parts {name: float})``.
    """

    clip: Any
    source: str
    target: str
    w_clip: float = 3.0
    w_l1: float = 0.0
    w_id: float = 0.0
    face: Any = None
    form: DirectionForm = "log"
    augment: Augment = field(default_factory=Augment)
    w_global: float = 0.0
    w_edge: float = 0.0
    edge_scales: int = 1
    edge_contrast: bool = False
    w_frame: float = 0.0
    w_layout: float = 0.0
    w_palette: float = 0.0

    def __post_init__(self) -> None:
        if self.w_id > 0 and self.face is None:
            raise ConfigError("the identity loss (id > 0) needs a face model: pass --face-weights PATH or set id=0")
        if min(self.w_clip, self.w_l1, self.w_id, self.w_global, self.w_edge, self.w_frame, self.w_layout, self.w_palette) < 0:
            raise ConfigError("loss weights must be >= 0")

    def __call__(
        self, x_gen: torch.Tensor, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Batch-mean loss (scalar tensor, differentiable in ``x_gen``) and its parts as floats."""
        terms: dict[str, tuple[float, Callable[[], torch.Tensor]]] = {
            "clip": (self.w_clip, lambda: directional_clip_loss(
                self.clip, x_gen, x0, self.source, self.target, self.form, self.augment, generator)),
            "global": (self.w_global, lambda: global_clip_loss(self.clip, x_gen, self.target)),
            "l1": (self.w_l1, lambda: l1_loss(x_gen, x0)),
            "id": (self.w_id, lambda: identity_loss(self.face, x_gen, x0)),
            "edge": (self.w_edge, lambda: edge_loss(x_gen, x0, self.edge_scales, self.edge_contrast)),
            "frame": (self.w_frame, lambda: frame_l1_loss(x_gen, x0)),
            "layout": (self.w_layout, lambda: layout_loss(x_gen, x0)),
            "palette": (self.w_palette, lambda: palette_loss(x_gen, x0)),
        }
        total = x_gen.new_zeros(())
        parts: dict[str, float] = {}
        for name, (w, fn) in terms.items():
            if w == 0:
                continue
            value = fn().mean()
            parts[name] = float(value.detach())
            total = total + w * value
        parts["total"] = float(total.detach())
        return total, parts
