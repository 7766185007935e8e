"""Conversion of ddim-format (Ho et al. DDPM) and ADM (guided-diffusion) UNet state dicts to
diffusers ``UNet2DModel`` state dicts, and the matching ``UNet2DModel`` configs.

Pure functions over state dicts (``dict[str, Tensor]``); no file I/O here (see :mod:`.unet`).
The mappings and the config traps are documented in ``shared/REFERENCE.md`` section 3.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from dclip_ray.errors import InputFileError

StateDict = dict[str, torch.Tensor]

FORMATS = ("diffusers", "ddim", "adm")


def ddpm_unet_config(
    ch: int = 128,
    ch_mult: Iterable[int] = (1, 1, 2, 2, 4, 4),
    num_res_blocks: int = 2,
    attn_resolutions: Iterable[int] = (16,),
    resolution: int = 256,
    in_channels: int = 3,
    out_channels: int = 3,
) -> dict:
    """``UNet2DModel`` config equivalent to the ddim repo's ``Model`` with these hyperparameters.

    ``attn_resolutions`` are feature-map sizes (16 means attention at the 16x16 level). The
    non-default values (norm_eps 1e-6, downsample_padding 0, flip_sin_to_cos False, freq_shift 1)
    are required for numerically equal outputs.
    """
    ch_mult, attn = list(ch_mult), set(attn_resolutions)
    down, res = [], resolution
    for _ in ch_mult:
        down.append("AttnDownBlock2D" if res in attn else "DownBlock2D")
        res //= 2
    up = [t.replace("Down", "Up") for t in reversed(down)]
    return {
        "sample_size": resolution,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "attention_head_dim": None,
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "act_fn": "silu",
        "resnet_time_scale_shift": "default",
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "time_embedding_type": "positional",
        "center_input_sample": False,
        "add_attention": True,
    }


def adm_unet_config(
    model_channels: int = 128,
    channel_mult: Iterable[int] = (1, 1, 2, 2, 4, 4),
    num_res_blocks: int = 1,
    attention_resolutions: Iterable[int] = (16,),
    num_head_channels: int = 64,
    resolution: int = 256,
    in_channels: int = 3,
    learn_sigma: bool = True,
) -> dict:
    """``UNet2DModel`` config equivalent to a guided-diffusion UNet with ``resblock_updown`` and
    ``use_scale_shift_norm`` (the released 256x256 models).

    ``attention_resolutions`` are downsampling rates as in guided-diffusion (16 means attention
    where the map is 1/16 of the input: the 16x16 level of a 256 model). ``learn_sigma`` gives 6
    output channels (eps, then the variance interpolation). ``attn_norm_num_groups`` 32 keeps the
    middle attention's GroupNorm (diffusers drops it for scale-shift models otherwise).
    """
    channel_mult, attn = list(channel_mult), set(attention_resolutions)
    down, ds = [], 1
    for _ in channel_mult:
        down.append("AttnDownBlock2D" if ds in attn else "ResnetDownsampleBlock2D")
        ds *= 2
    up = [("AttnUpBlock2D" if t.startswith("Attn") else "ResnetUpsampleBlock2D") for t in reversed(down)]
    return {
        "sample_size": resolution,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if learn_sigma else in_channels,
        "block_out_channels": [model_channels * m for m in channel_mult],
        "layers_per_block": num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
        "attention_head_dim": num_head_channels,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "resnet_time_scale_shift": "scale_shift",
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "time_embedding_type": "positional",
        "center_input_sample": False,
        "add_attention": True,
    }


def detect_format(state_dict: Mapping[str, object]) -> str | None:
    """'ddim', 'adm' or 'diffusers' from the state dict's key names; None when none fits."""
    keys = set(state_dict)
    if "temb.dense.0.weight" in keys and "conv_in.weight" in keys:
        return "ddim"
    if "time_embed.0.weight" in keys and "input_blocks.0.0.weight" in keys:
        return "adm"
    if "time_embedding.linear_1.weight" in keys and "conv_in.weight" in keys:
        return "diffusers"
    return None


_DDIM_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_DDIM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _sub(table: Mapping[str, str], rest: str, src_key: str) -> tuple[str, bool]:
    """Map ``rest`` = '<layer>.<param>' through ``table``; returns (new rest, is_attention_linear)."""
    layer, _, param = rest.partition(".")
    if layer not in table:
        raise KeyError(src_key)
    return f"{table[layer]}.{param}", table is _DDIM_ATTN and layer != "norm"


def convert_ddim_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """ddim-repo ``Model`` state dict -> ``UNet2DModel`` state dict for ``config``.

    Raises :class:`KeyError` naming the first key it cannot place (the caller turns it into a
    one-line user error).
    """
    n_levels = len(config["block_out_channels"])
    out: StateDict = {}
    for key, value in state_dict.items():
        squeeze = False
        if key.startswith("temb.dense.0."):
            new = "time_embedding.linear_1." + key[len("temb.dense.0."):]
        elif key.startswith("temb.dense.1."):
            new = "time_embedding.linear_2." + key[len("temb.dense.1."):]
        elif key.startswith(("conv_in.", "conv_out.")):
            new = key
        elif key.startswith("norm_out."):
            new = "conv_norm_out." + key[len("norm_out."):]
        elif m := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key):
            side, i, kind, j, rest = m.groups()
            blk = f"down_blocks.{i}" if side == "down" else f"up_blocks.{n_levels - 1 - int(i)}"
            if kind == "block":
                rest, _ = _sub(_DDIM_RESNET, rest, key)
                new = f"{blk}.resnets.{j}.{rest}"
            else:
                rest, squeeze = _sub(_DDIM_ATTN, rest, key)
                new = f"{blk}.attentions.{j}.{rest}"
        elif m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", key):
            new = f"down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", key):
            new = f"up_blocks.{n_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"mid\.(block_1|attn_1|block_2)\.(.+)", key):
            part, rest = m.groups()
            if part == "attn_1":
                rest, squeeze = _sub(_DDIM_ATTN, rest, key)
                new = f"mid_block.attentions.0.{rest}"
            else:
                rest, _ = _sub(_DDIM_RESNET, rest, key)
                new = f"mid_block.resnets.{0 if part == 'block_1' else 1}.{rest}"
        else:
            raise KeyError(key)
        if squeeze and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


_ADM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _adm_resnet(prefix: str, rest: str, value: torch.Tensor, src_key: str) -> StateDict:
    layer, _, param = rest.rpartition(".")
    if layer not in _ADM_RESNET:
        raise KeyError(src_key)
    return {f"{prefix}.{_ADM_RESNET[layer]}.{param}": value}


def _adm_attention(prefix: str, rest: str, value: torch.Tensor, head_dim: int, src_key: str) -> StateDict:
    """Split the legacy per-head qkv conv ([h0: q,k,v | h1: q,k,v | ...]) into to_q/to_k/to_v."""
    layer, _, param = rest.rpartition(".")
    if layer == "norm":
        return {f"{prefix}.group_norm.{param}": value}
    if layer == "proj_out":
        return {f"{prefix}.to_out.0.{param}": value[..., 0] if value.ndim == 3 else value}
    if layer != "qkv":
        raise KeyError(src_key)
    channels = value.shape[0] // 3
    heads = max(channels // head_dim, 1)
    d = channels // heads
    if param == "weight":
        w = value.reshape(heads, 3, d, -1)  # (heads, q/k/v, head_dim, C_in)
        parts = [w[:, i].reshape(channels, -1) for i in range(3)]
    else:
        b = value.reshape(heads, 3, d)
        parts = [b[:, i].reshape(channels) for i in range(3)]
    return {f"{prefix}.to_{n}.{param}": p.contiguous() for n, p in zip("qkv", parts, strict=True)}


_AdmBlockParts = list[tuple[str, str]]
"""The parts of one guided-diffusion ``input_blocks`` / ``output_blocks`` entry, in order: each
("res" or "attn", diffusers prefix of that resnet / attention / resnet up- or downsampler)."""

_ADM_MIDDLE: _AdmBlockParts = [("res", "mid_block.resnets.0"), ("attn", "mid_block.attentions.0"),
                               ("res", "mid_block.resnets.1")]

# guided-diffusion key prefix -> diffusers key prefix, for the layers outside the blocks
_ADM_RENAMES = (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."))

_ADM_BLOCK_KEY = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.+)")


def _adm_input_blocks(n_levels: int, n_res: int, down_attn: list[bool]) -> dict[int, _AdmBlockParts]:
    """``input_blocks`` index (from 1; 0 is ``conv_in``) -> its parts: per level ``n_res`` resnets
    (each with its attention where ``down_attn``), then a resnet downsampler except at the last level."""
    inputs: dict[int, _AdmBlockParts] = {}
    k = 1
    for lvl in range(n_levels):
        for j in range(n_res):
            parts = [("res", f"down_blocks.{lvl}.resnets.{j}")]
            if down_attn[lvl]:
                parts.append(("attn", f"down_blocks.{lvl}.attentions.{j}"))
            inputs[k] = parts
            k += 1
        if lvl != n_levels - 1:
            inputs[k] = [("res", f"down_blocks.{lvl}.downsamplers.0")]
            k += 1
    return inputs


def _adm_output_blocks(n_levels: int, n_res: int, up_attn: list[bool]) -> dict[int, _AdmBlockParts]:
    """``output_blocks`` index -> its parts: per level ``n_res + 1`` resnets (each with its attention
    where ``up_attn``), the last one followed by a resnet upsampler except at the last level."""
    outputs: dict[int, _AdmBlockParts] = {}
    k = 0
    for u in range(n_levels):
        for j in range(n_res + 1):
            parts = [("res", f"up_blocks.{u}.resnets.{j}")]
            if up_attn[u]:
                parts.append(("attn", f"up_blocks.{u}.attentions.{j}"))
            if j == n_res and u != n_levels - 1:
                parts.append(("res", f"up_blocks.{u}.upsamplers.0"))
            outputs[k] = parts
            k += 1
    return outputs


def _adm_renamed(key: str) -> str | None:
    """The diffusers key of a layer outside the blocks (time embedding, ``conv_in``, output norm and
    conv), or None for any other key."""
    for src, dst in _ADM_RENAMES:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def _adm_block_entries(
    m: re.Match[str],
    key: str,
    value: torch.Tensor,
    tables: Mapping[str, Mapping[int, _AdmBlockParts]],
    head_dim: int,
) -> StateDict:
    """The diffusers entries of one ``input_blocks`` / ``middle_block`` / ``output_blocks`` tensor
    (``m``: its :data:`_ADM_BLOCK_KEY` match; ``tables``: input and output block parts by group).
    ``value`` keeps its shape and dtype except attention tensors (qkv split into ``[C, C_in]``
    per q/k/v, conv1d kernels squeezed). Raises :class:`KeyError` naming ``key``."""
    group, a, b, rest = m.groups()
    try:
        if group == "middle_block":
            kind, prefix = _ADM_MIDDLE[int(a)]
            rest = f"{b}.{rest}" if b is not None else rest
        else:
            kind, prefix = tables[group][int(a)][int(b)]
    except (KeyError, IndexError, TypeError):
        raise KeyError(key) from None
    if kind == "res":
        return _adm_resnet(prefix, rest, value, key)
    return _adm_attention(prefix, rest, value, head_dim, key)


def convert_adm_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> StateDict:
    """guided-diffusion UNet state dict -> ``UNet2DModel`` state dict for ``config``
    (a config from :func:`adm_unet_config`: resblock up/down, scale-shift norm).

    The attention heads are ``C // config['attention_head_dim']``; the qkv weight is split per head.
    Raises :class:`KeyError` naming the first key it cannot place.
    """
    n_levels = len(config["block_out_channels"])
    n_res = int(config["layers_per_block"])
    head_dim = int(config["attention_head_dim"] or 10**9)
    down_attn = ["Attn" in t for t in config["down_block_types"]]
    up_attn = ["Attn" in t for t in config["up_block_types"]]
    tables = {"input_blocks": _adm_input_blocks(n_levels, n_res, down_attn),
              "output_blocks": _adm_output_blocks(n_levels, n_res, up_attn)}
    out: StateDict = {}
    for key, value in state_dict.items():
        renamed = _adm_renamed(key)
        if renamed is not None:
            out[renamed] = value
        elif m := _ADM_BLOCK_KEY.fullmatch(key):
            out.update(_adm_block_entries(m, key, value, tables, head_dim))
        else:
            raise KeyError(key)
    return out


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], fmt: str, config: Mapping) -> StateDict:
    """Dispatch on ``fmt`` ('ddim', 'adm' or 'diffusers' = unchanged)."""
    if fmt == "ddim":
        return convert_ddim_state_dict(state_dict, config)
    if fmt == "adm":
        return convert_adm_state_dict(state_dict, config)
    if fmt == "diffusers":
        return dict(state_dict)
    raise InputFileError(f"unknown checkpoint format {fmt!r}: expected one of {', '.join(FORMATS)}")


def scheduler_config(
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    beta_schedule: str = "linear",
    variance_type: str = "fixed_small",
) -> dict:
    """A diffusers ``scheduler_config.json`` dict (DDPMScheduler keys) for a raw checkpoint."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": int(T),
        "beta_start": float(beta_start),
        "beta_end": float(beta_end),
        "beta_schedule": beta_schedule,
        "variance_type": variance_type,
        "prediction_type": "epsilon",
        "clip_sample": False,
    }
