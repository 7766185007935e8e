"""Train the toy world's pixel-space DDPM: a small diffusers ``UNet2DModel`` on fresh renders.

Objective (Ho et al. 2020, "simple" loss): ``t ~ U{0..T-1}``, ``x_t = sqrt(alpha_bar_t) x0 +
sqrt(1 - alpha_bar_t) eps``, minimise ``|eps - eps_theta(x_t, t)|^2``; linear betas 1e-4..2e-2,
T = 1000. Every step renders a fresh batch (infinite data), so there is no dataset to store. The
saved weights are an exponential moving average (EMA) of the trained weights.

Output folder: a ``UNet2DModel.save_pretrained`` folder (safetensors) plus ``scheduler_config.json``
(a diffusers ``DDPMScheduler`` config) and ``train_log.json`` (arguments, losses, wall time).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dclip_ray.errors import ConfigError

from .render import SIZE, random_batch

UNET_CONFIG: dict = {
    "sample_size": SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
"""The toy UNet's architecture (~1.1 M parameters, no attention)."""

SCHEDULER_CONFIG: dict = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": False,
}
"""The paper's linear schedule as a diffusers ``DDPMScheduler`` config."""


@dataclass
class DDPMTrainConfig:
    """Hyper-parameters of :func:`train_ddpm` (all recorded in ``train_log.json``)."""

    steps: int = 2500
    batch_size: int = 32
    lr: float = 6e-4
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    save_every: int = 250
    layers_per_block: int = 1
    init: str | None = None  # continue from this UNet2DModel folder instead of random (its architecture
    # wins: layers_per_block is then ignored)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B,H,W,3]`` in [0,255] -> float32 ``[B,3,H,W]`` in [-1,1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _lr_factor(step: int, cfg: DDPMTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.final_lr_fraction + (1.0 - cfg.final_lr_fraction) * cosine


def save_unet(model: torch.nn.Module, out: Path, log: dict) -> None:
    """Write ``model`` (a ``UNet2DModel``) with the scheduler config and the training log to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")


def _build_unet(cfg: DDPMTrainConfig) -> tuple[torch.nn.Module, dict]:
    """The ``UNet2DModel`` to train and its config (without ``_``-keys): loaded from ``cfg.init``,
    else random from :data:`UNET_CONFIG` (draws from torch's global RNG)."""
    from diffusers import UNet2DModel

    if cfg.init is not None:
        init_dir = Path(cfg.init)
        if not (init_dir / "config.json").is_file():
            raise ConfigError(f"train-ddpm --init {cfg.init}: not a UNet2DModel folder (no config.json); "
                              "pass a folder written by train-ddpm")
        model = UNet2DModel.from_pretrained(str(init_dir))
        unet_cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    else:
        unet_cfg = dict(UNET_CONFIG, layers_per_block=cfg.layers_per_block)
        model = UNet2DModel.from_config(unet_cfg)
    return model, unet_cfg


def _alpha_bar() -> torch.Tensor:
    """float32 ``[T]``: cumulative products of ``1 - beta_t`` for :data:`SCHEDULER_CONFIG`, in (0,1]
    (the betas are summed in float64, then cast)."""
    T = SCHEDULER_CONFIG["num_train_timesteps"]
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"], T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


def _ema_decay(step: int, cfg: DDPMTrainConfig) -> float:
    """EMA decay at ``step`` (0-based): warmed up ``(1+step)/(10+step)`` only from random init;
    a continued run (``cfg.init``) starts its average at the loaded weights."""
    return cfg.ema_decay if cfg.init is not None else min(cfg.ema_decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """In place: ``p_ema <- decay * p_ema + (1 - decay) * p`` over matching parameters."""
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - decay)


def _optimise_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    alpha_bar: torch.Tensor,
    batch_size: int,
    grad_clip: float,
) -> float:
    """One step of the simple loss on a fresh batch: renders ``batch_size`` images (x0 float
    ``[B,3,H,W]`` in [-1,1]), draws ``t ~ U{0..T-1}`` and eps ``~ N(0,I)`` from torch's RNG, steps
    the optimiser and LR schedule; returns the batch loss (mean squared eps error)."""
    images, _, _, _ = random_batch(rng, batch_size)
    x0 = images_to_tensor(images)
    t = torch.randint(0, len(alpha_bar), (batch_size,))
    eps = torch.randn_like(x0)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps  # eq. 1
    loss = torch.nn.functional.mse_loss(model(x_t, t).sample, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    return loss.item()


def _train_loop(
    model: torch.nn.Module,
    ema: torch.nn.Module,
    rng: np.random.Generator,
    cfg: DDPMTrainConfig,
    out: Path,
    log: dict,
    log_fn: Callable[[str], None],
    t_start: float,
) -> None:
    """Run ``cfg.steps`` optimiser steps with EMA updates; every 25 steps append
    ``[step, mean loss]`` to ``log["losses"]`` and report; every ``cfg.save_every`` steps (but the
    last) save the EMA to ``out/checkpoint-<step>``."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    alpha_bar = _alpha_bar()
    running = 0.0
    for step in range(cfg.steps):
        loss = _optimise_step(model, opt, sched, rng, alpha_bar, cfg.batch_size, cfg.grad_clip)
        _ema_update(ema, model, _ema_decay(step, cfg))
        running += loss
        if (step + 1) % 25 == 0:
            avg = running / 25
            running = 0.0
            log["losses"].append([step + 1, round(avg, 6)])
            log_fn(f"step {step + 1}/{cfg.steps} loss {avg:.5f} lr {sched.get_last_lr()[0]:.2e} "
                   f"elapsed {time.time() - t_start:.0f}s")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            log["steps_done"] = step + 1
            log["wall_time_s"] = round(time.time() - t_start, 1)
            save_unet(ema, out / f"checkpoint-{step + 1}", log)


def train_ddpm(
    out: str | Path,
    cfg: DDPMTrainConfig | None = None,
    log_fn: Callable[[str], None] = print,
) -> dict:
    """Train the toy UNet and save its EMA weights to ``out`` (also every ``save_every`` steps).

    Returns the training log: config, parameter count, loss history, wall time in seconds.
    """
    cfg = cfg or DDPMTrainConfig()
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ConfigError(f"train-ddpm: steps and batch size must be >= 1 (got {cfg.steps}, {cfg.batch_size})")
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model, unet_cfg = _build_unet(cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log: dict = {"config": asdict(cfg), "unet_config": unet_cfg, "n_params": n_params, "losses": []}
    log_fn(f"toy UNet: {n_params} parameters; {cfg.steps} steps at batch {cfg.batch_size}")
    t_start = time.time()
    _train_loop(model, ema, rng, cfg, out, log, log_fn, t_start)
    log["steps_done"] = cfg.steps
    log["wall_time_s"] = round(time.time() - t_start, 1)
    save_unet(ema, out, log)
    log_fn(f"saved EMA UNet to {out} after {log['wall_time_s']:.0f}s")
    return log


@torch.no_grad()
def reconstruction_psnr(
    unet: torch.nn.Module,
    images: np.ndarray,
    t0: int = 500,
    n_inv_steps: int = 40,
    n_gen_steps: int = 40,
    schedule_config: dict | None = None,
) -> np.ndarray:
    """Per-image PSNR (dB, on [0,1]) of DDIM inversion to ``t0`` then generation back.

    ``unet``: a ``UNet2DModel`` predicting eps; ``images``: uint8 ``[B,H,W,3]``. The reconstruction
    is clamped to [-1,1]; inversion uses ``n_inv_steps``, generation ``n_gen_steps``.
    """
    from dclip_ray.diffusion import generate, invert, schedule_from_config

    schedule = schedule_from_config(schedule_config or SCHEDULER_CONFIG)

    def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t).sample

    x0 = images_to_tensor(images)
    x_t0 = invert(eps_fn, x0, t0, n_inv_steps, schedule)
    x_rec = generate(eps_fn, x_t0, t0, n_gen_steps, schedule).clamp(-1, 1)
    mse = ((x_rec - x0) / 2.0).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))).numpy()
