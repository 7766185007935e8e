"""The state of a fine-tuning run that callbacks see and checkpoints keep (:class:`TrainState`): its own
module so that :mod:`dclip_ray.finetune` and :mod:`dclip_ray.callbacks` both import it and not each other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    """Everything a run needs to continue bit for bit: the model under training, its Adam optimiser and
    lr schedule, the random generator (epoch orders, CLIP-view augmentations) and the position:
    ``epoch`` (0-based), ``batch_idx`` within it, ``step`` (optimiser steps so far), ``perm`` (the
    epoch's image order; None until drawn) and ``history`` (one row per optimiser step)."""

    unet: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    epoch: int = 0
    batch_idx: int = 0
    step: int = 0
    perm: list[int] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def lr(self) -> float:
        """The current learning rate."""
        return float(self.optimiser.param_groups[0]["lr"])
