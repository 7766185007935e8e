"""The full-size architecture with random weights: FLOPs per UNet forward, evaluations per edit, CPU
seconds per forward, and projected edits/s per GPU (issue 10 item 6).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward of the model built
on the ``meta`` device (shapes only, nothing computed; convolutions, matmuls and attention counted,
2 FLOPs per multiply-add; norms and activations are not). The CPU time is one or two real forwards of
the same architecture with random weights at batch 1 (the best of two; skipped with ``--quick``).

Projection: ``edits/s = utilisation x peak FLOP/s / (FLOPs per forward x evaluations per edit)``, with
the stated peak (dense bf16 tensor-core FLOP/s from the vendors' data sheets) and utilisation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import _common as c

PRESETS = ("celeba_hq", "afhq_dog")
GPUS = {"H100 SXM (bf16 dense 989 TFLOP/s)": 989e12, "A100 (bf16 dense 312 TFLOP/s)": 312e12}
UTILISATION = 0.40


def unet_of(preset: str, device: str = "cpu") -> torch.nn.Module:
    """The preset's UNet2DModel with random weights (no checkpoint needed) on ``device`` ('meta': no memory)."""
    from diffusers import UNet2DModel

    from dclip_ray.models.presets import get_preset

    cfg = get_preset(preset).unet_config()
    assert cfg is not None, f"{preset} has no raw-checkpoint architecture"
    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DModel.from_config(cfg).eval()


def forward_flops(model: torch.nn.Module, batch: int, resolution: int, device: str = "meta") -> int:
    """FLOPs of one forward of ``model`` on ``[batch,3,resolution,resolution]`` (FlopCounterMode)."""
    x = torch.zeros(batch, 3, resolution, resolution, device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, t)
    return int(fc.get_total_flops())


def cpu_seconds(model: torch.nn.Module, resolution: int, repeats: int) -> float:
    """Best wall time of ``repeats`` forwards at batch 1 on the CPU (seconds)."""
    x = torch.randn(1, 3, resolution, resolution)
    t = torch.full((1,), 500, dtype=torch.long)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t)
            best = min(best, time.perf_counter() - start)
    return best


def evals_per_edit(t0: int, n_inv: int, n_gen: int) -> dict[str, int]:
    """UNet evaluations per edit of a new image and from a cached latent (counted on the engine's
    own time sequence: inversion n_inv - 1 calls, generation n_gen calls)."""
    from dclip_ray.diffusion import generation_pairs, inversion_pairs

    inv = len(inversion_pairs(t0, n_inv))
    gen = len(generation_pairs(t0, n_gen))
    return {"inversion": inv, "generation": gen, "fresh": inv + gen, "cached": gen}


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """FLOPs, evaluations, CPU time and GPU projection for the 256x256 presets."""
    del out_dir
    from dclip_ray.models.presets import get_preset

    rows, proj, ratios = [], [], {}
    for name in PRESETS:
        p = get_preset(name)
        res = int(p.resolution or 256)
        meta = unet_of(name, "meta")
        params = sum(x.numel() for x in meta.parameters())
        flops = forward_flops(meta, 1, res)
        ev = evals_per_edit(int(p.t0 or 500), 40, 40)
        timed_res = res
        secs = None
        if not quick:  # building the real 100 M-parameter model alone takes seconds
            real = unet_of(name)
            secs = cpu_seconds(real, timed_res, 2)
            del real
        rows.append({"preset": name, "params_M": round(params / 1e6, 2), "resolution": res,
                     "tflop_per_forward": round(flops / 1e12, 4), "t0": p.t0, "S_inv/S_gen": "40/40",
                     "evals_fresh_edit": ev["fresh"], "evals_cached_edit": ev["cached"],
                     "tflop_per_fresh_edit": round(flops * ev["fresh"] / 1e12, 2),
                     "cpu_s_per_forward": round(secs, 3) if secs is not None else "",
                     "cpu_timed_at": f"{timed_res}px batch 1, {torch.get_num_threads()} threads" if secs is not None else "",
                     "cpu_edits_per_hour": round(3600 / (secs * ev["fresh"]), 2) if secs and not quick else ""})
        ratios[f"{name}_tflop_per_forward"] = flops / 1e12
        if secs is not None:
            ratios[f"{name}_cpu_s_per_forward_{timed_res}px"] = secs
        for gpu, peak in GPUS.items():
            rate = UTILISATION * peak / flops
            proj.append({"preset": name, "gpu": gpu, "utilisation": UTILISATION,
                         "forwards_per_s": round(rate, 1), "fresh_edits_per_s": round(rate / ev["fresh"], 2),
                         "cached_edits_per_s": round(rate / ev["cached"], 2),
                         "fresh_edits_per_hour": round(3600 * rate / ev["fresh"])})
        ratios[f"{name}_h100_fresh_edits_per_s_at_40pct"] = UTILISATION * GPUS[next(iter(GPUS))] / flops / ev["fresh"]
    return {"settings": {"machine": c.machine(), "model": "preset architectures with random weights",
                         "flop_counter": "torch.utils.flop_counter.FlopCounterMode on the meta device, batch 1",
                         "utilisation_assumed": UTILISATION, "quick": quick},
            "tables": {"full-size UNet (item 6)": rows, "projected edits/s per GPU (item 6)": proj},
            "ratios": ratios}


def markdown(res: dict[str, Any]) -> str:
    """The README performance tables from a full run's result."""
    lines = ["| preset | params | TFLOP / forward (256x256) | UNet evals per edit (new / cached latent) | CPU s / forward |",
             "|---|---|---|---|---|"]
    for r in res["tables"]["full-size UNet (item 6)"]:
        lines.append(f"| {r['preset']} | {r['params_M']} M | {r['tflop_per_forward']} | {r['evals_fresh_edit']} / "
                     f"{r['evals_cached_edit']} | {r['cpu_s_per_forward']} |")
    lines += ["", "| preset | GPU | utilisation | forwards/s | edits/s new image | edits/s cached latent |",
              "|---|---|---|---|---|---|"]
    for r in res["tables"]["projected edits/s per GPU (item 6)"]:
        lines.append(f"| {r['preset']} | {r['gpu']} | {r['utilisation']:.0%} | {r['forwards_per_s']} | "
                     f"{r['fresh_edits_per_s']} | {r['cached_edits_per_s']} |")
    return "\n".join(lines)
