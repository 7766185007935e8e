"""Faults that tests inject into fine-tuning, as callbacks (production code has no fault hooks).

In-process a test passes a callback to ``finetune(callbacks=[...])``. On Ray Train it patches, in the
driver, the Train loop that finetune-many hands each run (``dclip_ray.pipeline.finetune_many.train_loop``)
with :func:`failing_loop` (:func:`inject_failure`); the Train workers import this module by name, so the
test starts Ray with :func:`worker_pythonpath` as ``PYTHONPATH`` (the raylet and its workers inherit the
driver's environment).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from dclip_ray.callbacks import Callback

TESTS = os.path.dirname(os.path.abspath(__file__))


def worker_pythonpath() -> str:
    """``PYTHONPATH`` with this folder first, for a Ray started by the test to import this module."""
    return os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)


class FailOnce(Callback):
    """Raises RuntimeError (a worker failure) after ``after_batches`` batches of this attempt, once per
    ``flag`` file: the flag is created before raising, so the restarted worker trains on. With
    ``prompt`` only that prompt's Ray Train run fails (its run name is "{prompt}-{config hash}")."""

    def __init__(self, after_batches: int, flag: str, prompt: str | None = None) -> None:
        self.after, self.flag, self.prompt, self.seen = after_batches, Path(flag), prompt, 0

    def _mine(self) -> bool:
        if self.prompt is None:
            return True
        import ray.train

        return ray.train.get_context().get_experiment_name().startswith(f"{self.prompt}-")

    def on_batch_end(self, state) -> None:
        self.seen += 1
        if self.seen != self.after or self.flag.exists() or not self._mine():
            return
        self.flag.touch()
        raise RuntimeError(f"injected failure after {self.seen} batches (step {state.step})")


def failing_loop(run, after_batches: int, flag: str, prompt: str | None = None) -> None:
    """finetune-many's own Train loop with a :class:`FailOnce` among the run's callbacks (in the worker)."""
    import dclip_ray.pipeline.finetune_many as fm

    real = fm.train_run

    def with_fault(r, checkpoint_dir, callbacks, save=True):
        return real(r, checkpoint_dir, [*callbacks, FailOnce(after_batches, flag, prompt)], save)

    fm.train_run = with_fault
    try:
        fm.train_loop(run)
    finally:
        fm.train_run = real


def inject_failure(monkeypatch, after_batches: int, flag: str | Path, prompt: str | None = None) -> None:
    """Make finetune-many's Train runs fail once (see :class:`FailOnce`), by patching the loop the driver
    hands them."""
    import dclip_ray.pipeline.finetune_many as fm

    monkeypatch.setattr(fm, "train_loop", functools.partial(failing_loop, after_batches=after_batches,
                                                            flag=str(flag), prompt=prompt))
