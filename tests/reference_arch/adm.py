"""The guided-diffusion ("ADM", Dhariwal & Nichol 2021) UNet in its own state-dict layout.

Structure: time embedding [cos | sin] with frequencies exp(-log(1e4) * k / half) and
``time_embed.{0,2}`` dense layers; ``input_blocks`` (index 0 the input conv, then per level
``num_res_blocks`` x (ResBlock [+ AttentionBlock]) and a down-sampling ResBlock between levels);
``middle_block`` (res, attn, res); ``output_blocks`` (per level num_res_blocks + 1 x (ResBlock over
the concatenated skip [+ attn] [+ up-sampling ResBlock at the level's last block])); ``out``
(GroupNorm, SiLU, conv). ResBlock: ``in_layers`` (GroupNorm32 in fp32, SiLU, [avg-pool / nearest
resample of h and x], 3x3 conv), ``emb_layers`` (SiLU, dense to 2*C: scale and shift applied as
norm(h) * (1 + scale) + shift), ``out_layers`` (GroupNorm, SiLU, dropout, conv), 1x1
``skip_connection`` when channels change. AttentionBlock: GroupNorm, 1x1 ``qkv`` conv1d whose
3C outputs are laid out per head ([q, k, v] of head 0, then head 1, ...), q and k both scaled by
head_dim ** -1/4, 1x1 ``proj_out``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class GroupNorm32(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(c: int) -> GroupNorm32:
    return GroupNorm32(32, c)


class ResBlock(nn.Module):
    def __init__(self, cin: int, emb_ch: int, cout: int, up: bool = False, down: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * cout))
        self.out_layers = nn.Sequential(_norm(cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.up, self.down = up, down

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, c: int, num_head_channels: int):
        super().__init__()
        self.heads = c // num_head_channels
        self.norm = _norm(c)
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = nn.Conv1d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        xf = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(xf))
        d = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * d, hh * ww).split(d, dim=1)
        s = 1.0 / math.sqrt(math.sqrt(d))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s).float(), dim=-1).type(q.dtype)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, hh * ww)
        return (xf + self.proj_out(a)).reshape(b, c, hh, ww)


class _Seq(nn.ModuleList):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """``forward(x: [B,in_ch,R,R], t: LongTensor [B]) -> [B,out_ch,R,R]`` (eps, then the variance
    channels when ``learn_sigma``). ``attention_resolutions`` are downsampling rates (ds)."""

    def __init__(
        self,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (16,),
        num_head_channels: int = 64,
        in_channels: int = 3,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.mc = model_channels
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        ch = model_channels
        self.input_blocks = nn.ModuleList([_Seq([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels))
                self.input_blocks.append(_Seq(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Seq([ResBlock(ch, emb_ch, ch, down=True)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = _Seq(
            [ResBlock(ch, emb_ch, ch), AttentionBlock(ch, num_head_channels), ResBlock(ch, emb_ch, ch)]
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, ch, up=True))
                    ds //= 2
                self.output_blocks.append(_Seq(layers))
        out_ch = 2 * in_channels if learn_sigma else in_channels
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(model_channels, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.mc))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
