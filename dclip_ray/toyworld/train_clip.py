"""Train and evaluate the toy world's tiny CLIP (an open_clip ViT, config ``toy-clip-vit``).

Training is contrastive over captions: each step encodes a batch of fresh renders and the whole
caption set (every colour x shape, plus the hard-negative captions below, all in one randomly drawn
prompt template) and minimises the cross-entropy of each image against all captions (InfoNCE with
the full caption set as negatives). To make the model hard to fool when it guides an edit:

- augmentations: shifts of up to 2 pixels, Gaussian pixel noise (std up to 0.12 on [0,1]), slight
  blur, colour/brightness jitter, background grey-level jitter;
- hard negatives: two-coloured shapes (split by a random line) captioned ``"a red and blue circle"``,
  and irregular blobs (rejected unless the judge also calls them "blob") captioned ``"a red blob"``;
  a half-recoloured circle is therefore not a "blue circle", and a destroyed shape is not a "square".

:func:`evaluate_clip` measures held-out zero-shot accuracy and how much probability the model gives
"a blue circle" for half-red/half-blue circles and noisy red circles, and the success rate of a
small PGD attack that pushes red circles towards "blue circle".

This module holds the training loop; the captions, renders and augmentation live in
:mod:`.clip_data` and the evaluation in :mod:`.clip_eval`. Their names are re-exported here, the
import path to use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dclip_ray.errors import ConfigError

from .clip_data import (
    CLIP_MEAN,
    CLIP_STD,
    POSITIONS,
    TEMPLATES,
    CLIPTrainConfig,
    all_phrases,
    augment,
    blob_coverage,
    class_phrases,
    hard_negative_phrases,
    normalize,
    position_index,
    position_phrases,
    render_blob,
    render_two_colour,
    training_batch,
    uint8_to_01,
)
from .clip_eval import (
    direction_probe,
    encode_image,
    encode_text,
    evaluate_clip,
    pgd_attack_success,
    position_accuracy,
    robustness_probes,
    zero_shot_accuracy,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "POSITIONS",
    "TEMPLATES",
    "CLIPTrainConfig",
    "all_phrases",
    "augment",
    "blob_coverage",
    "class_phrases",
    "create_toy_clip",
    "direction_probe",
    "encode_image",
    "encode_text",
    "evaluate_clip",
    "hard_negative_phrases",
    "normalize",
    "pgd_attack_success",
    "position_accuracy",
    "position_index",
    "position_phrases",
    "render_blob",
    "render_two_colour",
    "robustness_probes",
    "train_clip",
    "training_batch",
    "uint8_to_01",
    "zero_shot_accuracy",
]

_LOG_EVERY = 50  # steps between two entries of the training log (mean loss, train accuracy over them)


def create_toy_clip(pretrained: str | Path | None = None) -> tuple[torch.nn.Module, Callable]:
    """Build ``toy-clip-vit`` with open_clip (random init, or weights from a local file) and its tokenizer."""
    import open_clip

    open_clip.add_model_config(Path(__file__).resolve().parent / "model_configs")
    model = open_clip.create_model("toy-clip-vit", pretrained=str(pretrained) if pretrained else None)
    return model, open_clip.get_tokenizer("toy-clip-vit")


def _optimizer(model: torch.nn.Module, cfg: CLIPTrainConfig,
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases, norms and embeddings) with linear warm-up then a cosine decay
    of the learning rate to 2 % of ``cfg.lr``."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def _contrastive_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    positions: np.ndarray,
    tokens: torch.Tensor,
    pos_tokens: torch.Tensor,
    position_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits [B, n_captions])`` of images ``x`` ``[B,3,H,W]`` in [0,1] against all captions
    (``tokens``), plus ``position_weight`` x the loss against the position captions (``pos_tokens``)
    for the images with a position (``positions`` >= 0)."""
    img_f = F.normalize(model.encode_image(normalize(x)), dim=-1)
    txt_f = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * img_f @ txt_f.T
    loss = F.cross_entropy(logits, target)
    has_pos = torch.from_numpy(positions >= 0)
    if position_weight > 0 and has_pos.any():
        # position captions make the embedding encode where the shape is, so that a directional
        # edit that moves the shape no longer points along a colour/shape-only text direction
        pos_f = F.normalize(model.encode_text(pos_tokens), dim=-1)
        pos_logits = model.logit_scale.exp() * img_f[has_pos] @ pos_f.T
        loss = loss + position_weight * F.cross_entropy(pos_logits, torch.from_numpy(positions)[has_pos])
    return loss, logits


def _caption_tokens(tokenizer: Callable, phrases: list[str]) -> dict[str, torch.Tensor]:
    """Tokens of ``phrases`` in each prompt template: ``{template: [len(phrases), context] int64}``."""
    return {t: tokenizer([t.format(p) for p in phrases]) for t in TEMPLATES}


def _optimise(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
              loss: torch.Tensor) -> None:
    """One optimiser and scheduler step on ``loss``; the logit scale is kept within [1, 100]."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def _save_fp16(model: torch.nn.Module, out: Path, save_file: Callable) -> None:
    # save_file (safetensors) is imported by train_clip before training, so a missing package fails early
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"model": "toy-clip-vit", "dtype": "float16"})


def train_clip(
    out: str | Path,
    cfg: CLIPTrainConfig | None = None,
    log_fn: Callable[[str], None] = print,
) -> dict:
    """Train the tiny CLIP (from scratch, or from ``cfg.init`` weights) and save fp16 safetensors to
    ``out``; returns the training log."""
    from safetensors.torch import save_file

    cfg = cfg or CLIPTrainConfig()
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ConfigError(f"train-clip: steps and batch size must be >= 1 (got {cfg.steps}, {cfg.batch_size})")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model, tokenizer = create_toy_clip(cfg.init)
    model.train()
    phrases = all_phrases()
    tokens = _caption_tokens(tokenizer, phrases)
    pos_tokens = _caption_tokens(tokenizer, position_phrases())
    blob_pool = [blob_coverage(rng) for _ in range(cfg.blob_pool_size)]
    opt, sched = _optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log: dict = {"config": asdict(cfg), "n_params": n_params, "phrases": phrases, "losses": []}
    log_fn(f"toy CLIP: {n_params} parameters; {cfg.steps} steps at batch {cfg.batch_size}, {len(phrases)} captions")
    t_start = time.time()
    running, correct, seen = 0.0, 0, 0
    positions = np.empty(cfg.batch_size, dtype=np.int64)
    for step in range(cfg.steps):
        images, targets = training_batch(rng, cfg.batch_size, cfg, phrases, blob_pool, positions)
        x = augment(uint8_to_01(images), gen, cfg.max_noise)
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        target = torch.from_numpy(targets)
        loss, logits = _contrastive_loss(model, x, target, positions, tokens[template], pos_tokens[template],
                                         cfg.position_weight)
        _optimise(model, opt, sched, loss)
        running += loss.item()
        correct += int((logits.argmax(-1) == target).sum())
        seen += len(target)
        if (step + 1) % _LOG_EVERY == 0:
            log["losses"].append([step + 1, round(running / _LOG_EVERY, 5), round(correct / seen, 4)])
            log_fn(f"step {step + 1}/{cfg.steps} loss {running / _LOG_EVERY:.4f} train-acc {correct / seen:.3f} "
                   f"elapsed {time.time() - t_start:.0f}s")
            running, correct, seen = 0.0, 0, 0
    log["wall_time_s"] = round(time.time() - t_start, 1)
    out = Path(out)
    _save_fp16(model, out, save_file)
    log_fn(f"saved toy CLIP (fp16) to {out} after {log['wall_time_s']:.0f}s")
    return log
