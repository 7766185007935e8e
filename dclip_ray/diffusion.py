"""The DDIM engine: pure, batched functions over a noise-prediction callable.

Every sampler takes ``eps_fn(x_t, t) -> eps`` with ``x_t: [B,C,H,W]`` float and ``t: int64 [B]`` (the raw
integer timestep in ``0..T-1``), so the same code serves inversion, generation, fine-tuning (gradients
on) and model combinations (closures in :mod:`dclip_ray.mixing`). Conventions follow the official
DiffusionCLIP implementation (../shared/REFERENCE.md sections 1-2):

- linear betas, ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)``, and ``alpha_bar(-1) = 1``;
- time sequence ``seq = [int(s) for s in linspace(0, 1, n) * t0]``, ``seq_next = [-1] + seq[:-1]``;
  inversion walks ``seq[k-1] -> seq[k]`` for k = 1..n-1 (n - 1 network calls), generation walks
  ``seq[k] -> seq_next[k]`` from the top down to step -1 (n network calls);
- no clipping of ``x0_pred``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dclip_ray.errors import ConfigError
from dclip_ray.progress import inner_steps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``eps_fn(x_t: [B,C,H,W], t: int64 [B]) -> eps: [B,C,H,W]``."""

StepCallback = Callable[[dict[str, Any]], None]
"""Called after every step with ``{"i", "t", "t_next", "x", "x_next", "x0_pred", "eps"}``."""


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion schedule.

    ``betas``: float64 [T] in (0, 1); ``alpha_bar``: float64 [T], the cumulative product of
    ``1 - betas``, decreasing from ~1 to ~0.
    """

    betas: torch.Tensor
    alpha_bar: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return int(self.betas.shape[0])

    def alpha_bar_at(self, t: int) -> float:
        """``alpha_bar`` at integer step ``t`` in ``[-1, T-1]``, with ``alpha_bar(-1) = 1``."""
        if not -1 <= t < self.num_timesteps:
            raise ConfigError(f"timestep {t} is outside [-1, {self.num_timesteps - 1}] of this schedule")
        return 1.0 if t < 0 else float(self.alpha_bar[t])


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Schedule:
    """The DDPM linear schedule (Ho et al.): betas evenly spaced in ``[beta_start, beta_end]``."""
    if num_timesteps < 2:
        raise ConfigError(f"num_timesteps={num_timesteps}: a schedule needs at least 2 steps")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ConfigError(f"betas [{beta_start}, {beta_end}] must satisfy 0 < beta_start <= beta_end < 1")
    betas = torch.from_numpy(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))
    return Schedule(betas=betas, alpha_bar=torch.cumprod(1.0 - betas, dim=0))


def schedule_from_config(config: dict[str, Any] | None) -> Schedule:
    """Build a schedule from a diffusers scheduler config (``scheduler_config.json`` keys).

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end`` and ``beta_schedule`` (only
    ``"linear"`` is supported, the schedule of every DiffusionCLIP checkpoint); ``None`` or missing
    keys give the paper's defaults (T = 1000, 1e-4 .. 2e-2).
    """
    config = dict(config or {})
    kind = config.get("beta_schedule", "linear")
    if kind != "linear":
        raise ConfigError(f"beta_schedule={kind!r} is not supported; DiffusionCLIP models use 'linear'")
    if config.get("trained_betas") is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
        return Schedule(betas=betas, alpha_bar=torch.cumprod(1.0 - betas, dim=0))
    return linear_schedule(
        int(config.get("num_train_timesteps", 1000)),
        float(config.get("beta_start", 1e-4)),
        float(config.get("beta_end", 2e-2)),
    )


def time_sequence(t0: int, n_steps: int) -> list[int]:
    """The official step sequence ``[int(s) for s in linspace(0, 1, n_steps) * t0]`` (0 .. t0)."""
    if n_steps < 2:
        raise ConfigError(f"n_steps={n_steps}: inversion and generation need at least 2 steps")
    if t0 < 1:
        raise ConfigError(f"t0={t0}: the return step must be >= 1")
    return [int(s) for s in np.linspace(0, 1, n_steps) * t0]


def inversion_pairs(t0: int, n_inv_steps: int) -> list[tuple[int, int]]:
    """``(t, t_next)`` pairs of DDIM inversion, 0 -> ... -> t0: ``n_inv_steps - 1`` network calls."""
    seq = time_sequence(t0, n_inv_steps)
    return list(zip(seq[:-1], seq[1:], strict=True))


def generation_pairs(t0: int, n_gen_steps: int) -> list[tuple[int, int]]:
    """``(t, t_next)`` pairs of DDIM generation, t0 -> ... -> 0 -> -1: ``n_gen_steps`` network calls."""
    seq = time_sequence(t0, n_gen_steps)
    seq_next = [-1] + seq[:-1]
    return list(zip(reversed(seq), reversed(seq_next), strict=True))


def _check_t(schedule: Schedule, t0: int) -> None:
    if t0 >= schedule.num_timesteps:
        raise ConfigError(f"t0={t0} must be below the schedule's T={schedule.num_timesteps}")


def _coef(value: float, like: torch.Tensor) -> torch.Tensor:
    # Schedule values are float64; do the arithmetic in the sample's dtype, as the official code does.
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """Eq. 6: ``x0_pred = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t)`` ([B,C,H,W], no clipping)."""
    return (x_t - _coef((1.0 - alpha_bar_t) ** 0.5, x_t) * eps) / _coef(alpha_bar_t**0.5, x_t)


def ddim_step(
    eps_fn: EpsFn,
    x: torch.Tensor,
    t: int,
    t_next: int,
    schedule: Schedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM move from step ``t`` to ``t_next`` (eq. 12 if ``t_next > t``, eq. 13 if ``t_next < t``).

    ``x``: ``x_t`` [B,C,H,W]. eps is evaluated at the current ``(x_t, t)``. With ``eta > 0``
    (generation only) the stochastic DDIM update adds ``c1 * z``, ``z`` drawn from ``generator`` or
    given as ``noise``. Returns ``(x_next, x0_pred, eps)``, all [B,C,H,W]; differentiable when the
    caller enables gradients.
    """
    if eta < 0:
        raise ConfigError(f"eta={eta} must be >= 0")
    if eta > 0 and t_next > t:
        raise ConfigError("eta > 0 is only defined for generation; DDIM inversion must be deterministic (eta=0)")
    a_t, a_next = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_next)
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps = eps_fn(x, t_batch)
    x0_pred = predict_x0(x, eps, a_t)
    if eta == 0:
        x_next = _coef(a_next**0.5, x) * x0_pred + _coef((1.0 - a_next) ** 0.5, x) * eps
        return x_next, x0_pred, eps
    c1 = eta * ((1.0 - a_t / a_next) * (1.0 - a_next) / (1.0 - a_t)) ** 0.5
    c2 = max(1.0 - a_next - c1**2, 0.0) ** 0.5
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator is None
                            else generator.device).to(x.device)
    x_next = _coef(a_next**0.5, x) * x0_pred + _coef(c2, x) * eps + _coef(c1, x) * noise
    return x_next, x0_pred, eps


def _walk(
    eps_fn: EpsFn,
    x: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    schedule: Schedule,
    eta: float,
    generator: torch.Generator | None,
    callback: StepCallback | None,
    disable: bool,
    desc: str,
) -> torch.Tensor:
    for i, (t, t_next) in enumerate(inner_steps(pairs, desc, enabled=not disable)):
        x_next, x0_pred, eps = ddim_step(eps_fn, x, t, t_next, schedule, eta=eta, generator=generator)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "x_next": x_next, "x0_pred": x0_pred, "eps": eps})
        x = x_next
    return x


def invert(
    eps_fn: EpsFn,
    x0: torch.Tensor,
    t0: int,
    n_inv_steps: int,
    schedule: Schedule,
    callback: StepCallback | None = None,
    disable: bool = True,
) -> torch.Tensor:
    """Deterministic DDIM inversion (DiffusionCLIP eq. 12): ``x0 [B,C,H,W] in [-1,1]`` -> latent ``x_t0``.

    Walks 0 -> ... -> t0 over ``time_sequence(t0, n_inv_steps)``: ``n_inv_steps - 1`` calls of ``eps_fn``.
    """
    _check_t(schedule, t0)
    return _walk(eps_fn, x0, inversion_pairs(t0, n_inv_steps), schedule, 0.0, None, callback, disable, "invert")


def generate(
    eps_fn: EpsFn,
    x_t0: torch.Tensor,
    t0: int,
    n_gen_steps: int,
    schedule: Schedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    disable: bool = True,
) -> torch.Tensor:
    """DDIM generation (DiffusionCLIP eq. 13): latent ``x_t0 [B,C,H,W]`` -> image ``[B,C,H,W]`` (~[-1,1]).

    Walks t0 -> ... -> 0 -> -1 over ``time_sequence(t0, n_gen_steps)``: ``n_gen_steps`` calls of
    ``eps_fn``. ``eta > 0`` gives stochastic DDIM, reproducible with a seeded ``generator``.
    """
    _check_t(schedule, t0)
    return _walk(eps_fn, x_t0, generation_pairs(t0, n_gen_steps), schedule, eta, generator, callback, disable,
                 "generate")


def add_noise(
    x0: torch.Tensor,
    t: int,
    schedule: Schedule,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stochastic forward diffusion (eq. 1): ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) w``.

    ``x0``: [B,C,H,W] in [-1,1]; ``w ~ N(0, I)`` drawn from ``generator`` unless ``noise`` is given.
    """
    if not 0 <= t < schedule.num_timesteps:
        raise ConfigError(f"t={t} is outside [0, {schedule.num_timesteps - 1}]")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                            device="cpu" if generator is None else generator.device).to(x0.device)
    a = schedule.alpha_bar_at(t)
    return _coef(a**0.5, x0) * x0 + _coef((1.0 - a) ** 0.5, x0) * noise
