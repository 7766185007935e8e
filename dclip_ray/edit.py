"""Editing with fine-tuned models, and the latent-optimisation baseline (paper Fig. 9).

All functions are batched over images ``[N,3,H,W] in [-1,1]`` and take eps functions (see
:mod:`dclip_ray.diffusion`), so any combination from :mod:`dclip_ray.mixing` works unchanged.
Inversion always uses the ORIGINAL model; only generation uses the fine-tuned one(s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dclip_ray.diffusion import EpsFn, Schedule, generate, invert
from dclip_ray.errors import ConfigError
from dclip_ray.losses import Augment, directional_clip_loss, l1_loss


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def invert_images(
    eps_fn: EpsFn, x0: torch.Tensor, t0: int, n_inv_steps: int, schedule: Schedule, batch_size: int = 16,
    disable: bool = True,
) -> torch.Tensor:
    """DDIM-invert ``x0`` ([N,3,H,W] in [-1,1]) to latents ``x_t0`` [N,3,H,W] with the original model."""
    return _batched(lambda x: invert(eps_fn, x, t0, n_inv_steps, schedule, disable=disable), x0, batch_size)


@torch.no_grad()
def generate_images(
    eps_fn: EpsFn, latents: torch.Tensor, t0: int, n_gen_steps: int, schedule: Schedule, batch_size: int = 16,
    eta: float = 0.0, seed: int | None = None, disable: bool = True,
) -> torch.Tensor:
    """DDIM-generate images [N,3,H,W] (~[-1,1]) from latents ``x_t0`` [N,3,H,W] with ``eps_fn``."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return _batched(lambda x: generate(eps_fn, x, t0, n_gen_steps, schedule, eta=eta, generator=gen,
                                       disable=disable), latents, batch_size)


@dataclass
class LatentOptimResult:
    """Output of :func:`latent_optimization`: images [N,3,H,W] in ~[-1,1] and the loss per iteration."""

    images: torch.Tensor
    losses: list[float]


def latent_optimization(
    eps_fn: EpsFn,
    clip: Any,
    x0: torch.Tensor,
    latents: torch.Tensor,
    source: str,
    target: str,
    schedule: Schedule,
    t0: int,
    n_gen_steps: int = 6,
    iterations: int = 30,
    lr: float = 0.02,
    w_clip: float = 3.0,
    w_l1: float = 1.0,
    augment: Augment | None = None,
    seed: int = 0,
) -> LatentOptimResult:
    """The baseline of the paper's Fig. 9: optimise the latent ``x_t0`` through the FROZEN model.

    ``x0``: [N,3,H,W] in [-1,1]; ``latents``: their inversions [N,3,H,W]. Each iteration generates from
    the current latents with gradients (``n_gen_steps`` calls), takes ``w_clip * L_direction + w_l1 *
    L1`` and an Adam step on the latents only. Returns the final generated images.
    """
    gen = torch.Generator().manual_seed(seed)
    z = latents.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    losses = []
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        x = generate(eps_fn, z, t0, n_gen_steps, schedule)
        loss = (w_clip * directional_clip_loss(clip, x, x0, source, target, "cosine", augment, gen)
                + w_l1 * l1_loss(x, x0)).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        images = generate(eps_fn, z.detach(), t0, n_gen_steps, schedule)
    return LatentOptimResult(images, losses)
