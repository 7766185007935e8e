"""Independent, compact re-implementations of the original architectures (parity tests only).

- :mod:`.ddpm`: the Ho et al. DDPM UNet in the ddim repository's ``Model`` layout (key names
  ``temb.dense``, ``down.i.block.j``, ``mid.block_1``, ``up.i`` ...).
- :mod:`.adm`: the guided-diffusion ("ADM") UNet with scale-shift norm, resblock up/down and the
  legacy per-head qkv attention layout.

Written from the papers' and repositories' descriptions; used only to prove the conversion to
diffusers ``UNet2DModel`` numerically.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded random values (zero-initialised layers included)."""
    g = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.GroupNorm)}
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                if id(p) in norm_weights:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model.eval()
