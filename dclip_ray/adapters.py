"""LoRA adapters for the diffusion UNet (issue 22), with peft: which layers get one, injecting them
into a trainable copy, saving an adapter (safetensors + its config), and applying a saved adapter to a
base UNet (merged into its weights, for generation). Ray-free.

Layers (``include``): ``conv`` (the resnet blocks' 3x3 convolutions ``conv1``/``conv2``), ``attention``
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and ``linear`` (the time-embedding projections
``time_emb_proj``, ``linear_1``, ``linear_2``). The input/output convolutions, up/down-sampling and
shortcut convolutions stay frozen. LoRA's B matrices start at zero, so an adapter fresh from
:func:`add_lora` leaves the UNet's output unchanged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from dclip_ray.errors import ConfigError, InputFileError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LAYER_GROUPS: dict[str, tuple[type, tuple[str, ...]]] = {
    "conv": (torch.nn.Conv2d, ("conv1", "conv2")),
    "attention": (torch.nn.Linear, ("to_q", "to_k", "to_v", "to_out.0")),
    "linear": (torch.nn.Linear, ("time_emb_proj", "linear_1", "linear_2")),
}
"""Layer groups a LoRA can cover: ``{group: (module type, name endings)}``."""


def lora_targets(unet: torch.nn.Module, include: tuple[str, ...] = ("conv", "attention", "linear")) -> list[str]:
    """Full module names of ``unet`` that the layer groups ``include`` cover (see the module docstring)."""
    unknown = set(include) - set(LAYER_GROUPS)
    if unknown:
        raise ConfigError(f"unknown LoRA layer group(s) {sorted(unknown)}; use {', '.join(LAYER_GROUPS)}")
    out = []
    for name, module in unet.named_modules():
        for group in include:
            kind, endings = LAYER_GROUPS[group]
            if isinstance(module, kind) and any(name == e or name.endswith("." + e) for e in endings):
                out.append(name)
    return out


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None = None,
             include: tuple[str, ...] = ("conv", "attention", "linear")) -> torch.nn.Module:
    """Inject LoRA layers of ``rank`` (scale ``alpha / rank``, default 1) into ``unet`` IN PLACE; only the
    LoRA weights stay trainable. Returns ``unet``."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ConfigError(f"--rank {rank} must be >= 1")
    targets = lora_targets(unet, include)
    if not targets:
        raise ConfigError(f"the UNet has no layer of the groups {include} to adapt")
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                     init_lora_weights=True)
    inject_adapter_in_model(cfg, unet, adapter_name="default")
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    unet._dclip_lora = {"rank": rank, "alpha": cfg.lora_alpha, "include": list(include)}  # type: ignore[attr-defined]
    return unet


def adapter_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of an adapted ``unet`` (names without the adapter name), detached, on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_adapter(unet: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write ``unet``'s adapter: ``adapter_model.safetensors`` and ``adapter_config.json`` (rank, alpha,
    layer groups). Returns the folder."""
    from safetensors.torch import save_file

    meta = getattr(unet, "_dclip_lora", None)
    if meta is None:
        raise ConfigError("this UNet carries no LoRA adapter (add_lora was not called)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(unet), str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps({"format": "dclip-ray/lora/1", **meta}, indent=2))
    return out


def is_adapter(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved adapter."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def apply_adapter(base_unet: torch.nn.Module, folder: str | Path, merge: bool = True) -> torch.nn.Module:
    """A copy of ``base_unet`` with the adapter saved in ``folder``; ``merge``: folded into the weights
    (generation then costs what the base costs). ``base_unet`` is not modified."""
    from peft import set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as e:
        raise InputFileError(f"cannot read the adapter in {folder}: {e}; re-run finetune --adapter lora") from None
    unet = add_lora(copy.deepcopy(base_unet), int(meta["rank"]), float(meta["alpha"]), tuple(meta["include"]))
    result = set_peft_model_state_dict(unet, weights)
    if getattr(result, "unexpected_keys", None):
        raise InputFileError(f"the adapter in {folder} does not fit this base UNet "
                             f"(e.g. {result.unexpected_keys[0]}); give the base it was trained on")
    for p in unet.parameters():
        p.requires_grad_(False)
    if merge:
        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    return unet.eval()


def adapter_bytes(unet: torch.nn.Module) -> int:
    """Bytes of an adapted ``unet``'s LoRA weights in fp32 (what a saved adapter holds, headers aside)."""
    return sum(v.numel() * 4 for v in adapter_state(unet).values())


def describe(unet: torch.nn.Module) -> dict[str, Any]:
    """``{"rank", "alpha", "include", "adapter_params", "base_params"}`` of an adapted ``unet``."""
    meta = getattr(unet, "_dclip_lora", {})
    lora = sum(v.numel() for v in adapter_state(unet).values())
    base = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    return {**meta, "adapter_params": lora, "base_params": base}
