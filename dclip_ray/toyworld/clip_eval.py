"""Evaluation of the toy world's tiny CLIP (:mod:`.train_clip`): the numbers of its model card.

:func:`evaluate_clip` gathers them: held-out zero-shot accuracy (:func:`zero_shot_accuracy`) and
position accuracy (:func:`position_accuracy`), the probability of "a blue circle" for half-recoloured
and noisy red circles (:func:`robustness_probes`), the edit-direction probe (:func:`direction_probe`)
and the success rate of a small PGD attack (:func:`pgd_attack_success`). :func:`encode_text` and
:func:`encode_image` give the L2-normalised features.

Every name here is re-exported by :mod:`dclip_ray.toyworld.train_clip`, the public import path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .clip_data import (
    POSITIONS,
    TEMPLATES,
    all_phrases,
    class_phrases,
    normalize,
    position_index,
    position_phrases,
    render_two_colour,
    uint8_to_01,
)
from .render import BACKGROUND, COLOURS, coverage, sample_dataset


def encode_text(model: torch.nn.Module, tokenizer: Callable, phrases: list[str], template: str = "a {}") -> torch.Tensor:
    """L2-normalised text features ``[len(phrases), D]`` of ``template.format(phrase)``."""
    return F.normalize(model.encode_text(tokenizer([template.format(p) for p in phrases])), dim=-1)


def encode_image(model: torch.nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features ``[B, D]`` of ``x01`` ``[B,3,H,W]`` in [0,1]."""
    return F.normalize(model.encode_image(normalize(x01)), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, tokenizer: Callable, n: int = 600, seed: int = 1234) -> float:
    """Held-out zero-shot accuracy over the 12 colour x shape captions ``"a {colour} {shape}"``."""
    ds = sample_dataset(n, seed)
    txt = encode_text(model, tokenizer, class_phrases())
    img = encode_image(model, uint8_to_01(np.stack([s.image for s in ds])))
    pred = (img @ txt.T).argmax(-1).numpy()
    truth = np.asarray([class_phrases().index(f"{s.colour} {s.shape}") for s in ds])
    return float((pred == truth).mean())


def _probs(model: torch.nn.Module, tokenizer: Callable, x01: torch.Tensor, phrases: list[str]) -> torch.Tensor:
    logits = model.logit_scale.exp() * encode_image(model, x01) @ encode_text(model, tokenizer, phrases).T
    return logits.softmax(-1)


@torch.no_grad()
def robustness_probes(model: torch.nn.Module, tokenizer: Callable, n: int = 64, seed: int = 4321) -> dict:
    """Mean probability of ``"a blue circle"`` for images that are not blue circles.

    ``half_red_blue``: circles split half red / half blue through the centre; ``noisy_red``: red
    circles plus Gaussian noise of std 0.1 on [0,1]. Each is measured over the 12 class captions
    (``*_12``) and over all trained captions (``*_all``, hard negatives included).
    """
    rng = np.random.default_rng(seed)
    half = uint8_to_01(np.stack([render_two_colour("red", "blue", "circle", rng, fraction=0.5) for _ in range(n)]))
    red = uint8_to_01(np.stack([s.image for s in sample_dataset(n, seed, colours=["red"], shapes=["circle"])]))
    gen = torch.Generator().manual_seed(seed)
    noisy = (red + 0.1 * torch.randn(red.shape, generator=gen)).clamp(0, 1)
    out = {}
    for name, x in (("half_red_blue", half), ("noisy_red", noisy), ("clean_red", red)):
        for label, phrases in (("12", class_phrases()), ("all", all_phrases())):
            p = _probs(model, tokenizer, x, phrases)[:, phrases.index("blue circle")]
            out[f"p_blue_circle_{name}_{label}"] = round(float(p.mean()), 4)
    return out


def pgd_attack_success(
    model: torch.nn.Module, tokenizer: Callable, eps: float = 4 / 255, steps: int = 10, n: int = 32, seed: int = 99
) -> float:
    """Fraction of red circles that an L-inf PGD attack of radius ``eps`` (on [0,1]) turns into the
    top-1 caption ``"blue circle"`` among the 12 class captions (lower = harder to fool)."""
    phrases = class_phrases()
    target = phrases.index("blue circle")
    x0 = uint8_to_01(np.stack([s.image for s in sample_dataset(n, seed, colours=["red"], shapes=["circle"])]))
    with torch.no_grad():
        txt = encode_text(model, tokenizer, phrases)
    delta = torch.zeros_like(x0, requires_grad=True)
    for _ in range(steps):
        logits = encode_image(model, (x0 + delta).clamp(0, 1)) @ txt.T
        loss = F.cross_entropy(logits * 100, torch.full((n,), target))
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= (eps / 4) * grad.sign()
            delta.clamp_(-eps, eps)
    with torch.no_grad():
        pred = (encode_image(model, (x0 + delta).clamp(0, 1)) @ txt.T).argmax(-1)
    return float((pred == target).float().mean())


@torch.no_grad()
def position_accuracy(model: torch.nn.Module, tokenizer: Callable, n: int = 300, seed: int = 77) -> float:
    """Held-out accuracy of the position (3 x 3 grid cell) read from the best of the 108 captions
    ``"{colour} {shape} {position}"`` (chance: 1/9)."""
    ds = sample_dataset(n, seed)
    txt = encode_text(model, tokenizer, position_phrases())
    img = encode_image(model, uint8_to_01(np.stack([s.image for s in ds])))
    pred = (img @ txt.T).argmax(-1).numpy() % len(POSITIONS)
    truth = np.asarray([position_index(s.params.cx, s.params.cy) for s in ds])
    return float((pred == truth).mean())


@torch.no_grad()
def direction_probe(model: torch.nn.Module, tokenizer: Callable, n: int = 50, seed: int = 0) -> dict[str, float]:
    """Mean cosine between the image change and the text direction "red circle" -> "blue circle"
    (templates averaged) for four edits of a red circle: recoloured in place (``inplace``), recoloured
    and moved (``moved``), only moved (``moved_only``) and erased (``erase``). A CLIP that guides edits
    well scores ``inplace`` clearly above ``moved`` and ``erase``."""
    from .render import ShapeParams

    rng = np.random.default_rng(seed)
    bg = np.asarray(BACKGROUND, np.float32)

    def draw(colour: str, cx: float, cy: float) -> np.ndarray:
        cov = coverage("circle", ShapeParams(cx=cx, cy=cy, r=8.0))[..., None]
        return np.rint(cov * np.asarray(COLOURS[colour], np.float32) + (1 - cov) * bg).astype(np.uint8)

    def text_mean(phrase: str) -> torch.Tensor:
        return F.normalize(torch.stack([encode_text(model, tokenizer, [phrase], t)[0] for t in TEMPLATES]).mean(0), dim=-1)

    direction = F.normalize(text_mean("blue circle") - text_mean("red circle"), dim=-1)
    refs, edits = [], {"inplace": [], "moved": [], "moved_only": [], "erase": []}
    for _ in range(n):
        cx, cy, cx2, cy2 = rng.uniform(11, 21, 4)
        refs.append(draw("red", cx, cy))
        edits["inplace"].append(draw("blue", cx, cy))
        edits["moved"].append(draw("blue", cx2, cy2))
        edits["moved_only"].append(draw("red", cx2, cy2))
        edits["erase"].append(np.broadcast_to(np.rint(bg).astype(np.uint8), refs[-1].shape))
    e_ref = encode_image(model, uint8_to_01(np.stack(refs)))
    out = {}
    for name, images in edits.items():
        d = F.normalize(encode_image(model, uint8_to_01(np.stack(images))) - e_ref, dim=-1)
        out[f"cos_{name}"] = round(float((d @ direction).mean()), 4)
    return out


def evaluate_clip(model: torch.nn.Module, tokenizer: Callable, n: int = 600) -> dict:
    """All the model-card numbers: zero-shot and position accuracy, the "blue circle" probes, the
    edit-direction probe, PGD success rates."""
    model.eval()
    metrics = {"zero_shot_acc": zero_shot_accuracy(model, tokenizer, n=n),
               "position_acc": position_accuracy(model, tokenizer)}
    metrics.update(direction_probe(model, tokenizer))
    metrics.update(robustness_probes(model, tokenizer))
    for eps in (2, 4, 8):
        metrics[f"pgd_success_eps{eps}"] = pgd_attack_success(model, tokenizer, eps=eps / 255)
    return metrics
