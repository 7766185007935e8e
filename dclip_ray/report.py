"""Before/after grids and (later) the HTML report."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 4) -> Path:
    """Save image rows as one PNG grid: each row [N,3,H,W] in [-1,1] (e.g. before, reconstruction, after).

    ``scale`` enlarges small images (nearest neighbour) so a 32x32 toy image stays visible.
    """
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
