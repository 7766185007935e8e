"""Callbacks of the fine-tuning loop (:func:`dclip_ray.finetune.finetune`): logging, progress, checkpoint
reporting, early stops, all outside the loop's math.

A callback subclasses :class:`Callback` and overrides the hooks it needs; the loop calls them in list
order with the live :class:`~dclip_ray.train_state.TrainState` (read it; change it only knowingly):

- ``on_train_begin(state)``: once, after a checkpoint (if any) is loaded;
- ``on_step_end(state, metrics)``: after every optimiser step, ``metrics`` being the step's history row
  ``{"epoch", "step", "t", "total", <loss part>...}`` (``state.step`` already counts the step);
- ``on_batch_end(state)``: after every batch and its checkpoint, if one is due;
- ``on_epoch_end(state)``: after the epoch's lr step and checkpoint (``state.epoch`` is the next epoch);
- ``on_checkpoint(path, metrics)``: after each state save into the folder ``path``;
- ``on_train_end(state)``: once, also when a hook raised (close files and bars here).

A hook ends the run early by raising :class:`StopTraining`: ``finetune`` then returns the partial
result (its checkpoints stay resumable). Any other exception propagates, as a real fault would.

"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dclip_ray.errors import ConfigError
from dclip_ray.progress import progress as progress_counter
from dclip_ray.train_state import TrainState


class StopTraining(Exception):  # noqa: N818  (a signal, not an error)
    """Raised by a callback hook to end fine-tuning cleanly with the partial result."""


class Callback:
    """Base class of fine-tuning callbacks: every hook does nothing (see the module docstring)."""

    def on_train_begin(self, state: TrainState) -> None:
        """Once, before the first step of this call (``state.step`` > 0 when resumed)."""

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        """After every optimiser step; ``metrics`` is the step's history row."""

    def on_batch_end(self, state: TrainState) -> None:
        """After every batch (and its checkpoint, if one was due)."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After every epoch's lr step and checkpoint."""

    def on_checkpoint(self, path: Path, metrics: dict[str, float]) -> None:
        """After each state save into the folder ``path``; ``metrics``: the last step's history row."""

    def on_train_end(self, state: TrainState) -> None:
        """Once at the end, also after an exception or a :class:`StopTraining`."""


def emit(callbacks: Iterable[Callback], hook: str, *args: Any) -> None:
    """Call ``hook`` (e.g. ``"on_step_end"``) of every callback with ``args``, in order."""
    for cb in callbacks:
        getattr(cb, hook)(*args)


class ProgressBar(Callback):
    """Progress over ``total`` optimiser steps with the last loss: a bar on a terminal, a plain line
    every 30 s off it (:func:`dclip_ray.progress.progress`); a resumed run starts at ``state.step``."""

    def __init__(self, total: int, desc: str, disable: bool = False) -> None:
        self.total, self.desc, self.disable = total, desc, disable
        self.bar: Any = None

    def on_train_begin(self, state: TrainState) -> None:
        self.bar = progress_counter(self.total, self.desc, enabled=not self.disable, unit="steps", initial=state.step)

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        if "loss" in metrics:
            self.bar.set_postfix(loss=float(metrics["loss"]), refresh=False)
        self.bar.update(1)

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()


def tensorboard_writer(log_dir: str | Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` (torch's, else tensorboardX's); ConfigError when
    neither ``tensorboard`` nor ``tensorboardX`` is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(f"--tensorboard {log_dir}: TensorBoard logging needs the tensorboard package "
                              "(pip install tensorboard)") from None
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardLogger(Callback):
    """Logs every step's loss parts as ``loss/<part>`` and the lr as ``lr`` (x-axis: the step) to
    TensorBoard event files in ``log_dir``; ConfigError at construction without tensorboard(X)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.writer = tensorboard_writer(log_dir)

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        step = int(metrics["step"])
        for k, v in metrics.items():
            if k not in ("epoch", "step", "t"):
                self.writer.add_scalar(f"loss/{k}", float(v), step)
        self.writer.add_scalar("lr", state.lr, step)

    def on_train_end(self, state: TrainState) -> None:
        self.writer.close()


class CheckpointHook(Callback):
    """Adapts a plain function ``fn(path, metrics)`` to :meth:`Callback.on_checkpoint`."""

    def __init__(self, fn: Callable[[Path, dict[str, float]], None]) -> None:
        self.fn = fn

    def on_checkpoint(self, path: Path, metrics: dict[str, float]) -> None:
        self.fn(path, metrics)
