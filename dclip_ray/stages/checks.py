"""Checks every stage runs before any work starts (exit 1 at once, never after every shard was computed)."""

from __future__ import annotations

import fsspec

from dclip_ray.diffusion import Schedule
from dclip_ray.errors import ConfigError
from dclip_ray.urls import redact


def check_steps(schedule: Schedule, t0: int, n_inv_steps: int | None = None, n_gen_steps: int | None = None,
                batch_size: int | None = None) -> None:
    """Validate the step settings against the base model's schedule before any work starts (a bad
    value fails at once with exit 1, never after every shard was computed). Raises :class:`ConfigError`
    naming the option."""
    if not 1 <= t0 < schedule.num_timesteps:
        raise ConfigError(f"--t0 {t0} must be in [1, {schedule.num_timesteps - 1}] (the base model has "
                          f"T={schedule.num_timesteps} steps); the toy world and the paper use 300-600")
    check_step_counts(t0, n_inv_steps, n_gen_steps)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")


def check_step_counts(t0: int, n_inv_steps: int | None = None, n_gen_steps: int | None = None) -> None:
    """The step counts need no model: each in [2, t0 + 1]. Raises :class:`ConfigError` naming the option."""
    if t0 < 1:
        raise ConfigError(f"--t0 {t0} must be >= 1")
    for option, n in (("--n-inv", n_inv_steps), ("--n-gen", n_gen_steps)):
        if n is not None and not 2 <= n <= t0 + 1:
            raise ConfigError(f"{option} {n} must be in [2, t0 + 1 = {t0 + 1}] (steps between 0 and t0)")


def check_out_folder(out: str, option: str = "--out") -> None:
    """Refuse an output location that exists and is not a folder (a file), naming it."""
    try:
        fs, p = fsspec.core.url_to_fs(out)
        is_file = fs.isfile(p)
    except Exception:  # noqa: BLE001  (unreachable stores fail later with their own message)
        return
    if is_file:
        raise ConfigError(f"{option} {redact(out)} is a file; give a folder (it is created when missing)")
