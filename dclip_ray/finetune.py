"""CLIP-guided fine-tuning of a diffusion model from cached DDIM latents (DiffusionCLIP sec. 3.1-3.3).

Framework-free (no Ray): the Ray Train loop in :mod:`dclip_ray.pipeline` calls :func:`finetune` with
its own callbacks (:mod:`dclip_ray.callbacks`). In parts: :class:`TrainState` with :func:`save_state` /
:func:`load_state`; :func:`efficient_batch` / :func:`full_batch` (one batch); :func:`train_epoch`;
:func:`finetune` orchestrates. Two modes (../shared/REFERENCE.md sec. 2):

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

from dclip_ray import __version__
from dclip_ray.adapters import ADAPTER_FORMAT, add_lora, save_adapter
from dclip_ray.callbacks import Callback, CheckpointHook, ProgressBar, StopTraining, TensorBoardLogger, emit
from dclip_ray.config import FinetuneConfig, Mode
from dclip_ray.diffusion import Schedule, ddim_step, generation_pairs
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.hashing import state_dict_sha256
from dclip_ray.losses import EditLoss
from dclip_ray.models.card import CARD_FILE, write_card
from dclip_ray.train_state import TrainState

__all__ = ["STATE_FILE", "FinetuneConfig", "FinetuneResult", "Mode", "finetune", "loss_history", "save_finetuned"]
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


def init_state(base_unet: torch.nn.Module, config: FinetuneConfig) -> TrainState:
    """A fresh run: a trainable copy of ``base_unet`` (which is not modified), Adam at ``config.lr``
    with the lr multiplied by ``config.lr_gamma`` after every epoch, the generator seeded by ``config.seed``."""
    unet = copy.deepcopy(base_unet).train()
    for p in unet.parameters():
        p.requires_grad_(True)
    if config.adapter == "lora":  # only the adapters train (dclip_ray.adapters)
        add_lora(unet, config.lora_rank)
    if config.grad_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=config.lr_gamma)
    return TrainState(unet, opt, sched, torch.Generator().manual_seed(config.seed))


def save_state(path: Path, state: TrainState) -> None:
    """Write ``state`` to the file ``path`` atomically: a half-written checkpoint is never taken as complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": state.unet.state_dict(), "optimizer": state.optimiser.state_dict(),
        "scheduler": state.scheduler.state_dict(), "generator": state.generator.get_state(),
        "epoch": state.epoch, "batch_idx": state.batch_idx, "step": state.step, "perm": state.perm,
        "history": state.history,
    }, tmp)
    os.replace(tmp, path)


def load_state(path: Path, state: TrainState) -> TrainState:
    """Restore ``state`` (in place, and returned) from a file written by :func:`save_state`;
    InputFileError when it cannot be read."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputFileError(f"{path}: unreadable fine-tuning checkpoint ({e}); delete it to restart") from e
    state.unet.load_state_dict(st["model"])
    state.optimiser.load_state_dict(st["optimizer"])
    state.scheduler.load_state_dict(st["scheduler"])
    state.generator.set_state(st["generator"])
    state.epoch, state.batch_idx, state.step, state.perm = st["epoch"], st["batch_idx"], st["step"], st["perm"]
    state.history = list(st["history"])
    return state


@dataclass(frozen=True)
class TrainSetup:
    """What stays fixed during a run: the data (``x0``: [N,3,H,W] in [-1,1]; ``latents``: [N,3,H,W],
    their inversions at ``config.t0``), the loss models, the noise ``schedule``, the generation pairs
    (t, t_next), the network call ``eps_fn(x, t)`` of the model under training, the autocast context and
    the checkpoint file (None: no checkpoints)."""

    config: FinetuneConfig
    clip: Any
    face: Any
    x0: torch.Tensor
    latents: torch.Tensor
    schedule: Schedule
    pairs: list[tuple[int, int]]
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast: Any
    state_path: Path | None

    @property
    def n_batches(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        return -(-self.x0.shape[0] // self.config.batch_size)


def _record_step(state: TrainState, t: int, parts: dict[str, float], callbacks: list[Callback]) -> None:
    state.history.append({"epoch": state.epoch, "step": state.step, "t": t, **parts})
    state.step += 1
    emit(callbacks, "on_step_end", state, state.history[-1])


def efficient_batch(state: TrainState, setup: TrainSetup, loss_fn: EditLoss, x0: torch.Tensor,
                    x_t0: torch.Tensor, callbacks: list[Callback]) -> None:
    """One batch in ``efficient`` mode: at every generation step t -> t_next, the loss on that step's
    ``x0_pred``, backprop, an optimiser step, then detach x_next (one network call in each graph).
    ``x0``: [B,3,H,W] in [-1,1], the batch's images; ``x_t0``: [B,3,H,W], their latents at t0."""
    x = x_t0
    for t, t_next in setup.pairs:
        state.optimiser.zero_grad(set_to_none=True)
        with setup.autocast:
            x_next, x0_pred, _ = ddim_step(setup.eps_fn, x, t, t_next, setup.schedule)
            loss, parts = loss_fn(x0_pred.float(), x0, state.generator)
        loss.backward()
        state.optimiser.step()
        x = x_next.detach()
        _record_step(state, t, parts, callbacks)


def full_batch(state: TrainState, setup: TrainSetup, loss_fn: EditLoss, x0: torch.Tensor, x_t0: torch.Tensor,
               callbacks: list[Callback]) -> None:
    """One batch in ``full`` mode: generate from ``x_t0`` through every step with gradients on, the loss
    on the final image, one optimiser step (history ``t`` = -1). Shapes as :func:`efficient_batch`."""
    state.optimiser.zero_grad(set_to_none=True)
    x = x_t0
    with setup.autocast:
        for t, t_next in setup.pairs:
            x, _, _ = ddim_step(setup.eps_fn, x, t, t_next, setup.schedule)
        loss, parts = loss_fn(x.float(), x0, state.generator)
    loss.backward()
    state.optimiser.step()
    _record_step(state, -1, parts, callbacks)


def checkpoint(state: TrainState, setup: TrainSetup, callbacks: list[Callback]) -> None:
    """Save ``state`` to ``setup.state_path`` (if any), then call every ``on_checkpoint(folder, metrics)``
    with the last step's history row as metrics."""
    if setup.state_path is None:
        return
    save_state(setup.state_path, state)
    emit(callbacks, "on_checkpoint", setup.state_path.parent, state.history[-1] if state.history else {})


def train_epoch(state: TrainState, setup: TrainSetup, callbacks: list[Callback]) -> None:
    """The rest of epoch ``state.epoch`` from batch ``state.batch_idx``: draw the image order (once per
    epoch), run each batch, checkpoint every ``checkpoint_every`` batches and at the end, after the lr step."""
    config = setup.config
    if state.perm is None:
        state.perm = torch.randperm(setup.x0.shape[0], generator=state.generator).tolist()
    loss_fn = config.edit_loss(setup.clip, setup.face, state.epoch)  # cheap; the refinement stage decides per epoch
    batch = efficient_batch if config.mode == "efficient" else full_batch
    device = next(state.unet.parameters()).device
    while state.batch_idx < setup.n_batches:
        idx = state.perm[state.batch_idx * config.batch_size : (state.batch_idx + 1) * config.batch_size]
        batch(state, setup, loss_fn, setup.x0[idx].to(device), setup.latents[idx].to(device), callbacks)
        state.batch_idx += 1
        every = config.checkpoint_every
        if every and state.batch_idx % every == 0 and state.batch_idx < setup.n_batches:
            checkpoint(state, setup, callbacks)
        emit(callbacks, "on_batch_end", state)
    state.epoch, state.batch_idx, state.perm = state.epoch + 1, 0, None
    state.scheduler.step()
    checkpoint(state, setup, callbacks)
    emit(callbacks, "on_epoch_end", state)


def _setup(state: TrainState, clip: Any, face: Any, x0: torch.Tensor, latents: torch.Tensor, schedule: Schedule,
           config: FinetuneConfig, checkpoint_dir: str | Path | None) -> TrainSetup:
    device = next(state.unet.parameters()).device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=config.bf16 and device.type == "cuda")
    eps_fn = _eps_of(state.unet, config.grad_checkpointing and config.mode == "full")
    return TrainSetup(config, clip, face, x0, latents, schedule, generation_pairs(config.t0, config.n_gen_steps),
                      eps_fn, autocast, Path(checkpoint_dir) / STATE_FILE if checkpoint_dir else None)


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
    disable: bool = True,
    tensorboard_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> FinetuneResult:
    """Fine-tune a copy of ``base_unet`` so that generation from ``latents`` moves ``source`` -> ``target``.

    ``x0``: [N,3,H,W] in [-1,1], the training images; ``latents``: [N,3,H,W], their DDIM inversions at
    ``config.t0`` by the original model. ``base_unet`` is not modified. With ``checkpoint_dir`` the run
    saves its state there (every ``checkpoint_every`` batches and at each epoch end) and resumes from it
    when a state exists. ``callbacks`` (:class:`dclip_ray.callbacks.Callback`) see every step, batch,
    epoch and checkpoint; one that raises :class:`~dclip_ray.callbacks.StopTraining` ends the run with
    the partial result. Conveniences: ``on_checkpoint(dir, metrics)`` after each save; ``disable``: no
    progress bar; ``tensorboard_dir``: log every step's losses (``loss/<part>``) and the lr there.
    """
    if x0.shape != latents.shape or x0.ndim != 4:
        raise ConfigError(f"images {tuple(x0.shape)} and latents {tuple(latents.shape)} must both be [N,3,H,W]")
    config.edit_loss(clip, face)  # a bad loss setup fails here, before any state is loaded
    state = init_state(base_unet, config)
    setup = _setup(state, clip, face, x0, latents, schedule, config, checkpoint_dir)
    if setup.state_path is not None and setup.state_path.exists():
        load_state(setup.state_path, state)
    resumed_from = state.step
    steps_per_batch = len(setup.pairs) if config.mode == "efficient" else 1
    cbs: list[Callback] = [ProgressBar(config.epochs * setup.n_batches * steps_per_batch,
                                       f"finetune {config.target!r}", disable)]
    cbs += [TensorBoardLogger(tensorboard_dir)] if tensorboard_dir is not None else []
    cbs += [CheckpointHook(on_checkpoint)] if on_checkpoint is not None else []
    cbs += list(callbacks)
    start = time.perf_counter()
    emit(cbs, "on_train_begin", state)
    try:
        while state.epoch < config.epochs:
            train_epoch(state, setup, cbs)
    except StopTraining:
        pass
    finally:
        emit(cbs, "on_train_end", state)
    return FinetuneResult(state.unet.eval(), state.history, time.perf_counter() - start, resumed_from)


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
    if config.adapter == "lora":
        save_adapter(result.unet, out)  # the base stays where it is: the card names it and its sha256
    else:
        result.unet.save_pretrained(out, safe_serialization=True)
    if schedule_config is not None:
        (out / "scheduler_config.json").write_text(json.dumps(schedule_config, indent=2))
    card = {
        "format": ADAPTER_FORMAT if config.adapter == "lora" else "dclip-ray/finetuned-unet/1",
        "source": config.source,
        "target": config.target,
        "config": asdict(config),
        "base_model_sha256": state_dict_sha256(base_unet),
        "dclip_ray_version": __version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),  # a seed reproduces its model at the same count (CPU)
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "loss_history": loss_history(result.history),
        "metrics": metrics or {},
        **(extra or {}),
    }
    write_card(str(out), card)  # last: its presence marks the folder complete (strict JSON: a NaN loss is null)
    return out


def remove_model(folder: str) -> None:
    """Remove a model folder (local path or fsspec URL) if it is there."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def copy_model(src: str, dst: str, card: dict[str, Any]) -> None:
    """Copy the model folder ``src`` to ``dst`` (local paths or fsspec URLs; ``dst`` replaced; ``src ==
    dst``: only the card is rewritten) with ``card`` as its ``dclip.json``, written last through a temporary
    name (its presence marks the folder complete)."""
    import fsspec

    fs, sp = fsspec.core.url_to_fs(src)
    dfs, dp = fsspec.core.url_to_fs(dst)
    if src != dst:
        remove_model(dst)
    dfs.makedirs(dp, exist_ok=True)
    for name in sorted(fs.ls(sp, detail=False)) if src != dst else []:
        leaf = name.rstrip("/").rsplit("/", 1)[-1]
        if leaf in (CARD_FILE, f"{CARD_FILE}.tmp"):
            continue
        with fs.open(name, "rb") as fi, dfs.open(f"{dp.rstrip('/')}/{leaf}", "wb") as fo:
            while chunk := fi.read(1 << 24):
                fo.write(chunk)
    write_card(dst, card)
