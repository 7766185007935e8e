"""CLIP-guided fine-tuning of a diffusion model from cached DDIM latents (DiffusionCLIP sec. 3.1-3.3).

Framework-free (no Ray): the Ray Train loop in :mod:`dclip_ray.pipeline` calls :func:`finetune` with
its own checkpoint hook. Two modes (../shared/REFERENCE.md sec. 2):

- ``full``: generate from each latent through all ``n_gen_steps`` with gradients on, loss on the final
  image, one optimiser step per batch (memory grows with ``n_gen_steps``; ``grad_checkpointing``
  recomputes each step's activations instead of storing them);
- ``efficient``: at every generation step, the loss on that step's ``x0_pred``, backprop, optimiser
  step, then detach before the next step (one network call in the graph).

Deterministic on CPU for a given seed; a run checkpoints its full state (weights, optimiser, lr
schedule, random generator, position) and a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from dclip_ray import __version__
from dclip_ray.config import FinetuneConfig, Mode
from dclip_ray.diffusion import Schedule, ddim_step, generation_pairs
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.hashing import state_dict_sha256

__all__ = ["STATE_FILE", "FinetuneConfig", "FinetuneResult", "Mode", "finetune", "loss_history", "save_finetuned",
           "tensorboard_writer"]
STATE_FILE = "finetune_state.pt"


@dataclass
class FinetuneResult:
    """What a run produced: the trained model, per-step loss history, timing."""

    unet: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_step: int = 0

    @property
    def final_loss(self) -> float:
        """Mean total loss over the last epoch's steps (nan when nothing ran)."""
        last = [h for h in self.history if h["epoch"] == self.history[-1]["epoch"]] if self.history else []
        return sum(h["total"] for h in last) / len(last) if last else float("nan")


def _eps_of(unet: torch.nn.Module, checkpointed: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t).sample[:, :3]

    if not checkpointed:
        return eps_fn
    return lambda x, t: torch.utils.checkpoint.checkpoint(eps_fn, x, t, use_reentrant=False)


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


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a half-written checkpoint is never taken as complete


def finetune(
    base_unet: torch.nn.Module,
    clip: Any,
    x0: torch.Tensor,
    latents: torch.Tensor,
    schedule: Schedule,
    config: FinetuneConfig,
    face: Any = None,
    checkpoint_dir: str | Path | None = None,
    on_checkpoint: Callable[[Path, dict[str, float]], None] | None = None,
    stop_after_batches: int | None = None,
    disable: bool = True,
    tensorboard_dir: str | Path | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``base_unet`` so that generation from ``latents`` moves ``source`` -> ``target``.

    ``x0``: [N,3,H,W] in [-1,1], the training images; ``latents``: [N,3,H,W], their DDIM inversions at
    ``config.t0`` by the original model. ``base_unet`` is not modified. With ``checkpoint_dir`` the run
    saves its state there (every ``checkpoint_every`` steps and at each epoch end) and resumes from it
    when a state exists; ``on_checkpoint(dir, metrics)`` is called after each save.
    ``stop_after_batches`` ends the run after that many batches in all (to test resumption).
    ``tensorboard_dir``: also log every step's losses (``loss/<part>``) and the lr there (TensorBoard
    event files; needs ``tensorboard`` or ``tensorboardX``).
    """
    if x0.shape != latents.shape or x0.ndim != 4:
        raise ConfigError(f"images {tuple(x0.shape)} and latents {tuple(latents.shape)} must both be [N,3,H,W]")
    device = next(base_unet.parameters()).device
    unet = copy.deepcopy(base_unet).train()
    for p in unet.parameters():
        p.requires_grad_(True)
    if config.grad_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    config.edit_loss(clip, face)  # a bad loss setup fails here, before any state is loaded
    opt = torch.optim.Adam(unet.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=config.lr_gamma)
    gen = torch.Generator().manual_seed(config.seed)
    n = x0.shape[0]
    n_batches = (n + config.batch_size - 1) // config.batch_size
    pairs = generation_pairs(config.t0, config.n_gen_steps)
    steps_per_batch = len(pairs) if config.mode == "efficient" else 1
    history: list[dict[str, float]] = []
    epoch, batch_idx, step, perm = 0, 0, 0, None

    state_path = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir else None
    if state_path is not None and state_path.exists():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise InputFileError(f"{state_path}: unreadable fine-tuning checkpoint ({e}); delete it to restart") from e
        unet.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["generator"])
        epoch, batch_idx, step, perm = st["epoch"], st["batch_idx"], st["step"], st["perm"]
        history = list(st["history"])
    resumed_from = step
    tb = tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None else None

    def log_step(h: dict[str, float]) -> None:
        if tb is not None:
            for k, v in h.items():
                if k not in ("epoch", "step", "t"):
                    tb.add_scalar(f"loss/{k}", float(v), int(h["step"]))
            tb.add_scalar("lr", opt.param_groups[0]["lr"], int(h["step"]))

    def save(metrics: dict[str, float]) -> None:
        if state_path is None:
            return
        _save_state(state_path, {
            "model": unet.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "generator": gen.get_state(), "epoch": epoch, "batch_idx": batch_idx, "step": step,
            "perm": perm, "history": history,
        })
        if on_checkpoint is not None:
            on_checkpoint(state_path.parent, metrics)

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=config.bf16 and device.type == "cuda")
    eps_fn = _eps_of(unet, config.grad_checkpointing and config.mode == "full")
    start = time.perf_counter()
    bar = tqdm(total=config.epochs * n_batches * steps_per_batch, initial=step, disable=disable,
               desc=f"finetune {config.target!r}")
    while epoch < config.epochs:
        if perm is None:
            perm = torch.randperm(n, generator=gen).tolist()
        loss_fn = config.edit_loss(clip, face, epoch)  # stateless and cheap: the stage decides per epoch
        while batch_idx < n_batches:
            if stop_after_batches is not None and epoch * n_batches + batch_idx >= stop_after_batches:
                bar.close()
                if tb is not None:
                    tb.close()
                return FinetuneResult(unet.eval(), history, time.perf_counter() - start, resumed_from)
            idx = perm[batch_idx * config.batch_size : (batch_idx + 1) * config.batch_size]
            xb, xl = x0[idx].to(device), latents[idx].to(device)
            x = xl
            if config.mode == "efficient":
                for t, t_next in pairs:
                    opt.zero_grad(set_to_none=True)
                    with autocast:
                        x_next, x0_pred, _ = ddim_step(eps_fn, x, t, t_next, schedule)
                        loss, parts = loss_fn(x0_pred.float(), xb, gen)
                    loss.backward()
                    opt.step()
                    x = x_next.detach()
                    history.append({"epoch": epoch, "step": step, "t": t, **parts})
                    log_step(history[-1])
                    step += 1
                    bar.update(1)
            else:
                opt.zero_grad(set_to_none=True)
                with autocast:
                    for t, t_next in pairs:
                        x, _, _ = ddim_step(eps_fn, x, t, t_next, schedule)
                    loss, parts = loss_fn(x.float(), xb, gen)
                loss.backward()
                opt.step()
                history.append({"epoch": epoch, "step": step, "t": -1, **parts})
                log_step(history[-1])
                step += 1
                bar.update(1)
            batch_idx += 1
            if config.checkpoint_every and batch_idx % config.checkpoint_every == 0 and batch_idx < n_batches:
                save(history[-1])
        epoch, batch_idx, perm = epoch + 1, 0, None
        sched.step()
        save(history[-1] if history else {})
    bar.close()
    if tb is not None:
        tb.close()
    return FinetuneResult(unet.eval(), history, time.perf_counter() - start, resumed_from)


def loss_history(history: list[dict[str, float]], max_points: int = 2000) -> dict[str, list[float]]:
    """The per-step history as columns ``{"step": [...], "epoch": [...], "total": [...], <part>: [...]}``
    (rounded to 6 significant digits; evenly thinned to at most ``max_points`` steps) for the model card."""
    if not history:
        return {}
    stride = max(1, -(-len(history) // max_points))
    rows = history[::stride]
    keys = [k for k in rows[0] if k != "t"]
    return {k: [float(f"{float(r.get(k, float('nan'))):.6g}") for r in rows] for k in keys}


def save_finetuned(
    result: FinetuneResult,
    out_dir: str | Path,
    config: FinetuneConfig,
    base_unet: torch.nn.Module,
    schedule_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the fine-tuned model as a diffusers folder (safetensors) + ``dclip.json`` + scheduler config.

    The folder loads with plain ``UNet2DModel.from_pretrained(out_dir)``. ``dclip.json`` records the
    prompt pair, t0, S_inv, S_gen, loss weights, lr schedule, epochs, seed, base-model sha256, library
    version and final metrics.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.unet.save_pretrained(out, safe_serialization=True)
    if schedule_config is not None:
        (out / "scheduler_config.json").write_text(json.dumps(schedule_config, indent=2))
    card = {
        "format": "dclip-ray/finetuned-unet/1",
        "source": config.source,
        "target": config.target,
        "config": asdict(config),
        "base_model_sha256": state_dict_sha256(base_unet),
        "dclip_ray_version": __version__,
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "loss_history": loss_history(result.history),
        "metrics": metrics or {},
        **(extra or {}),
    }
    tmp = out / "dclip.json.tmp"
    tmp.write_text(json.dumps(card, indent=2, default=str))
    os.replace(tmp, out / "dclip.json")  # written last: its presence marks the folder complete
    return out
