"""LoRA adapters against full fine-tuning (issue 22), side by side in one run on the toy world.

1. Quality, judged from pixels (:func:`dclip_ray.toyworld.pairs.judge_edit`, no CLIP): the two
   acceptance edits (red -> blue circle with the colour recipe, red circle -> square with the shape
   recipe) fine-tuned fully and as a rank-8 LoRA (the recipe's ``lora`` learning rate), at fine-tuning
   seeds 0 and 1; 16 training images, 32 held-out images judged (:class:`~dclip_ray.toyworld.protocol.ToyProtocol`).
2. Size: the saved adapter (safetensors) against the full model's weights, toy UNet at rank 8; and the
   full-size projection: the ``celeba_hq`` architecture with random weights (meta device, no memory) at
   ranks 4, 8 and 16, and the bytes to ship for 100 prompts.
3. Restyle memory per actor: the peak RSS of a fresh process that builds the restyler with K = 1, 5, 20
   fine-tuned models and restyles one 4-image shard (2 steps), full copies against LoRA adapters (one
   working copy of the base, :class:`~dclip_ray.adapters.AdapterBank`); the per-model growth is the
   slope from K = 1 to 20.
4. Fine-tuning time and memory: one epoch of red -> blue (efficient mode, batch 1 and 8, 16 images,
   S_gen 6), full against LoRA rank 8, each in a fresh process (:func:`benchmarks.finetune_bench.measure`).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import _common as c

RANK = 8


def settings(quick: bool) -> dict[str, Any]:
    """Sizes of one run: full (``make bench``) or quick (smoke test; numbers not meaningful)."""
    if quick:
        return {"seeds": [], "ks": [1, 2], "ft_images": 4, "ft_batches": [1], "ranks": [4]}
    return {"seeds": [0, 1], "ks": [1, 5, 20], "ft_images": 16, "ft_batches": [1, 8], "ranks": [4, 8, 16]}


def _quality(s: dict[str, Any]) -> list[dict[str, Any]]:
    from dclip_ray.toyworld.pairs import pair_by_name
    from dclip_ray.toyworld.protocol import ToyProtocol

    if not s["seeds"]:
        return []
    proto = ToyProtocol()
    rows = []
    for name in ("red_circle-to-blue_circle", "red_circle-to-red_square"):
        pair = pair_by_name(name)
        for seed in s["seeds"]:
            for adapter in ("full", "lora"):
                over = {"adapter": adapter, "lora_rank": RANK} if adapter == "lora" else {}
                with c.threads(2):
                    r = proto.run(pair, seed=seed, overrides=over)
                rows.append({"pair": name, "recipe": r["recipe"], "adapter": adapter if adapter == "full" else f"lora r{RANK}",
                             "seed": seed, "success": round(r["success"], 3), "iou": round(r["iou"], 3),
                             "background": round(r["background"], 2), "seconds": r["seconds"]})
    return rows


def _random_lora(base: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    import copy

    from dclip_ray.adapters import add_lora

    unet = add_lora(copy.deepcopy(base), rank)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed * 1000 + len(n)))
    return unet


def lora_folders(root: Path, k: int, t0: int) -> list[str]:
    """``k`` LoRA adapter folders ``root/lora1..lorak`` of rank 8 over the toy UNet (random non-zero B:
    the same work as a trained adapter), each with a card naming its base."""
    from dclip_ray.config import FinetuneConfig
    from dclip_ray.finetune import FinetuneResult, save_finetuned
    from dclip_ray.models import load_unet

    base = load_unet(c.TOY_MODEL).eval()
    out = []
    for i in range(1, k + 1):
        dst = root / f"lora{i}"
        if not (dst / "dclip.json").exists():
            cfg = FinetuneConfig("red circle", "blue circle", t0=t0, adapter="lora", lora_rank=RANK)
            save_finetuned(FinetuneResult(_random_lora(base, RANK, i), [], 0.0, 0), dst, cfg, base,
                           extra={"base_model": c.TOY_MODEL})
        out.append(str(dst))
    return out


def restyle_rss(inputs: str, out: str, models: list[str], t0: int) -> dict[str, float]:
    """In this process: build the restyler over ``models`` and restyle the first shard of ``inputs`` at
    2 steps; ``{"loaded_mb", "peak_mb"}`` (RSS after loading, peak RSS)."""
    from dclip_ray.stages.inputs import input_shards
    from dclip_ray.stages.restyle import ShardRestyler
    from dclip_ray.stages.restyle_config import build_restyle_config

    torch.set_num_threads(1)
    cfg = build_restyle_config(out, models=models, t0=t0, n_inv_steps=2, n_gen_steps=2, batch_size=4)
    restyler = ShardRestyler(cfg)
    with open("/proc/self/statm") as f:
        loaded = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    name, path = input_shards(inputs)[0]
    restyler.run(name, path)
    return {"loaded_mb": round(loaded, 1), "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _restyle_memory(tmp: Path, s: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    t0 = 500
    inputs = c.toy_shards(tmp, 4, 4, seed=3)
    kmax = max(s["ks"])
    kinds = {"full": c.finetuned_copies(tmp, kmax, t0), f"lora r{RANK}": lora_folders(tmp, kmax, t0)}
    rows, peak = [], {}
    for k in s["ks"]:
        for kind, folders in kinds.items():
            out = subprocess.run([sys.executable, "-m", "benchmarks.lora_bench", "restyle", inputs,
                                  str(tmp / f"rss_{kind.split()[0]}_{k}"), ",".join(folders[:k]), str(t0)],
                                 capture_output=True, text=True, check=True, cwd=str(Path(__file__).resolve().parents[1]))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peak[(kind, k)] = r["peak_mb"]
            rows.append({"models": kind, "K": k, **r})
    lo, hi = min(s["ks"]), max(s["ks"])
    ratios = {}
    for kind in kinds:
        slope = (peak[(kind, hi)] - peak[(kind, lo)]) / (hi - lo)
        ratios[f"restyle_mb_per_model_{kind.split()[0]}"] = slope
        rows.append({"models": kind, "K": f"per model ({lo}->{hi})", "loaded_mb": "", "peak_mb": round(slope, 2)})
    if ratios["restyle_mb_per_model_full"] > 0:  # (quick mode's K = 1 -> 2 can be within noise)
        ratios["restyle_per_model_lora_over_full"] = ratios["restyle_mb_per_model_lora"] / ratios["restyle_mb_per_model_full"]
    lora = f"lora r{RANK}"
    for k in s["ks"]:
        ratios[f"restyle_peak_lora_over_full_K{k}"] = peak[(lora, k)] / peak[("full", k)]
        rows.append({"models": "lora/full", "K": k, "loaded_mb": "", "peak_mb": round(peak[(lora, k)] / peak[("full", k)], 3)})
    return rows, ratios


def _sizes(tmp: Path, s: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from dclip_ray.adapters import adapter_bytes

    from .flops_bench import unet_of

    toy_full = sum(f.stat().st_size for f in Path(c.toy_unet_dir()).glob("*.safetensors"))
    lora = Path(lora_folders(tmp, 1, 500)[0]) / "adapter_model.safetensors"
    rows = [{"model": "toy_shapes", "rank": RANK, "adapter_bytes": lora.stat().st_size, "full_bytes": toy_full,
             "adapter/full": round(lora.stat().st_size / toy_full, 4), "100_prompts_base_plus_adapters_gib": "",
             "100_prompts_full_copies_gib": ""}]
    ratios = {"toy_adapter_over_full": lora.stat().st_size / toy_full}
    from dclip_ray.adapters import add_lora

    for rank in s["ranks"]:
        unet = unet_of("celeba_hq", "meta")
        full = sum(p.numel() * 4 for p in unet.parameters())
        add_lora(unet, rank)
        a = adapter_bytes(unet)
        rows.append({"model": "celeba_hq (random weights, fp32)", "rank": rank, "adapter_bytes": a, "full_bytes": full,
                     "adapter/full": round(a / full, 4), "100_prompts_base_plus_adapters_gib": round((full + 100 * a) / 2**30, 2),
                     "100_prompts_full_copies_gib": round(100 * full / 2**30, 1)})
        ratios[f"celeba_hq_adapter_over_full_r{rank}"] = a / full
    return rows, ratios


def _finetune(s: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows, by = [], {}
    for batch in s["ft_batches"]:
        for adapter in ("full", "lora"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.finetune_bench", "efficient", str(batch),
                                  str(s["ft_images"]), "1", "6", adapter], capture_output=True, text=True, check=True,
                                 cwd=str(Path(__file__).resolve().parents[1]))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            by[(adapter, batch)] = r
            r["grad_adam_mb"] = round(r["trainable_params"] * 12 / 2**20, 2)  # fp32 gradient + Adam's two moments
            rows.append({k: r[k] for k in ("adapter", "batch", "images", "trainable_params", "grad_adam_mb", "train_s",
                                           "saved_mb", "peak_rss_growth_mb")})
    ratios = {}
    for batch in s["ft_batches"]:
        lo, fu = by[("lora", batch)], by[("full", batch)]
        ratios[f"finetune_time_lora_over_full_b{batch}"] = lo["train_s"] / fu["train_s"]
        ratios[f"finetune_saved_lora_over_full_b{batch}"] = lo["saved_mb"] / fu["saved_mb"]
        rows.append({"adapter": "lora/full", "batch": batch, "images": "",
                     "trainable_params": round(lo["trainable_params"] / fu["trainable_params"], 4),
                     "grad_adam_mb": round(lo["grad_adam_mb"] / fu["grad_adam_mb"], 4),
                     "train_s": round(lo["train_s"] / fu["train_s"], 3), "saved_mb": round(lo["saved_mb"] / fu["saved_mb"], 3),
                     "peak_rss_growth_mb": round(lo["peak_rss_growth_mb"] / fu["peak_rss_growth_mb"], 3)
                     if fu["peak_rss_growth_mb"] > 0 else ""})
    return rows, ratios


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Items 2 and 3 of issue 22 (see the module docstring). Returns ``{"settings", "tables", "ratios"}``."""
    s = settings(quick)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as d:
        tmp = Path(d)
        size_rows, r1 = _sizes(tmp, s)
        mem_rows, r2 = _restyle_memory(tmp, s)
        ft_rows, r3 = _finetune(s)
        quality_rows = _quality(s)
    return {"settings": {**s, "rank": RANK, "machine": c.machine(), "seconds": round(time.perf_counter() - start, 1)},
            "tables": {"quality, judged from pixels (item 2)": quality_rows, "adapter size (items 2, 3)": size_rows,
                       "restyle peak RSS per actor, K models (item 2)": mem_rows,
                       "fine-tuning one epoch, full vs LoRA (item 2)": ft_rows},
            "ratios": {**r1, **r2, **r3}}


if __name__ == "__main__":
    if sys.argv[1] == "restyle":  # restyle INPUTS OUT MODELS T0 (restyle_rss in a fresh process)
        print(json.dumps(restyle_rss(sys.argv[2], sys.argv[3], sys.argv[4].split(","), int(sys.argv[5]))))
