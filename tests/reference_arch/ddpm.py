"""The Ho et al. DDPM UNet, laid out like the ddim repository's ``Model`` (its state-dict keys).

Structure (Ho et al. 2020, appendix B; ddim repo ``models/diffusion.py`` naming):
sinusoidal time embedding [sin | cos] with frequencies exp(-log(1e4) * k / (half - 1)), two dense
layers with swish; per level ``num_res_blocks`` residual blocks (GroupNorm(32, eps 1e-6), swish,
3x3 conv, + dense(swish(temb)), GroupNorm, swish, dropout, 3x3 conv; 1x1 "nin" shortcut when
channels change), single-head self-attention at the listed resolutions, a stride-2 conv
downsample padded (0, 1, 0, 1); middle block res-attn-res; up path with num_res_blocks + 1 blocks
per level over the concatenated skips, nearest x2 + 3x3 conv upsample; GroupNorm, swish, conv out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_ch: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        self.cin, self.cout = cin, cout

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.cin != self.cout:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hh * ww)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=2)
        out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DDPMModel(nn.Module):
    """``forward(x: [B,in_ch,R,R], t: LongTensor [B]) -> eps [B,out_ch,R,R]``."""

    def __init__(
        self,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        resolution: int = 256,
        in_channels: int = 3,
        out_ch: int = 3,
    ):
        super().__init__()
        self.ch, self.num_res_blocks, self.L = ch, num_res_blocks, len(ch_mult)
        self.temb_ch = ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i in range(self.L):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResBlock(cin, cout, self.temb_ch))
                cin = cout
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != self.L - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(cin, cin, self.temb_ch)
        self.mid.attn_1 = AttnBlock(cin)
        self.mid.block_2 = ResBlock(cin, cin, self.temb_ch)
        ups: list[nn.Module] = []
        for i in reversed(range(self.L)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * ch_mult[i]
            for j in range(num_res_blocks + 1):
                skip = ch * ch_mult[i] if j < num_res_blocks else ch * in_mult[i]
                level.block.append(ResBlock(cin + skip, cout, self.temb_ch))
                cin = cout
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb.dense[0](timestep_embedding(t, self.ch))
        temb = self.temb.dense[1](F.silu(temb))
        hs = [self.conv_in(x)]
        for i in range(self.L):
            for j in range(self.num_res_blocks):
                h = self.down[i].block[j](hs[-1], temb)
                if len(self.down[i].attn) > 0:
                    h = self.down[i].attn[j](h)
                hs.append(h)
            if i != self.L - 1:
                hs.append(self.down[i].downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for i in reversed(range(self.L)):
            for j in range(self.num_res_blocks + 1):
                h = self.up[i].block[j](torch.cat([h, hs.pop()], dim=1), temb)
                if len(self.up[i].attn) > 0:
                    h = self.up[i].attn[j](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
