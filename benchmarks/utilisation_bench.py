"""Utilisation: UNet FLOP/s achieved inside restyle vs the fp32 GEMM FLOP/s of a large matmul, measured
in the same run at the same torch thread count (issue 10 item 7; goal >= 45 % at batch >= 8).

- GEMM: ``[2048,2048] @ [2048,2048]`` fp32, 2 x 2048^3 FLOPs, best of 5, at 1 thread (the restyle
  actor's thread count: 0.5 CPU -> 1 thread) and, for reference, at all CPUs.
- Restyle: one Ray Data actor (0.5 CPU, 1 torch thread) over one shard of toy images; achieved FLOP/s =
  FLOPs per image-forward of the toy UNet (FlopCounterMode at that batch size, divided by the batch) x
  the UNet evaluations the restyle counted / the seconds the restyler reports for the shard (inside the
  actor; this includes decoding, PNG encoding and writing the shard).
- UNet share (issue 28 item 2): of the actor's seconds on the shard, the share inside UNet calls (the
  restyler's own timers); the rest is decoding, scoring, PNG encoding, hashing and writing.
- Overlap (issue 28 item 2): one shard of 256 toy images restyled at batch 8 and 32 with the actor's decode-ahead
  and write-behind lanes (``io_depth`` 2, the default) and with each step in turn (``io_depth`` 0), side by side in
  one run, at the suite's step count and at 2 steps (a cheap UNet, as on a GPU, where the overhead shows).
- Bare loop: the same invert + generate on the same images in this process at 1 thread, no I/O: the
  UNet's own efficiency, which bounds what the pipeline can reach.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import _common as c

T0 = 500
GEMM_N = 2048


def gemm_flops_per_s(n: int = GEMM_N, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of ``[n,n] @ [n,n]`` over ``repeats`` runs at the current torch thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_image_forward(unet: torch.nn.Module, batch: int, size: int = 32) -> float:
    """FLOPs of one UNet forward per image at batch size ``batch`` (FlopCounterMode, meta-free: the toy
    UNet is cheap enough to run)."""
    x = torch.zeros(batch, 3, size, size)
    t = torch.full((batch,), T0, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, t)
    return fc.get_total_flops() / batch


def bare_loop(unet: torch.nn.Module, x0: torch.Tensor, batch: int, steps: int) -> tuple[float, int]:
    """invert + generate ``x0`` [N,3,32,32] in [-1,1] in batches: (seconds, image evaluations)."""
    from dclip_ray.diffusion import generate, invert
    from dclip_ray.models import eps_fn_of
    from dclip_ray.models.base import load_base
    from dclip_ray.stages.common import CountingEps

    sched = load_base(c.TOY_MODEL).schedule
    eps = CountingEps(eps_fn_of(unet))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x0), batch):
            generate(eps, invert(eps, x0[i:i + batch], T0, steps, sched), T0, steps, sched)
    return time.perf_counter() - start, eps.evals


def settings(quick: bool) -> dict[str, Any]:
    """Sizes of one run: full (``make bench``) or quick (smoke test)."""
    if quick:
        return {"n_images": 8, "batches": [1, 8], "steps": 3, "overlap_images": 16}
    return {"n_images": 32, "batches": [1, 8, 32], "steps": 10, "overlap_images": 256}


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Achieved UNet FLOP/s (restyle and bare loop) as a share of GEMM FLOP/s at 1 thread."""
    del out_dir
    from dclip_ray.models import load_unet
    from dclip_ray.stages.inputs import decode_shard, input_shards

    s = settings(quick)
    unet = load_unet(c.TOY_MODEL).eval()
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-util-") as d:
        tmp = Path(d)
        inputs = c.toy_shards(tmp, s["n_images"], s["n_images"])
        models = c.finetuned_copies(tmp, 1, T0)
        x0 = torch.stack([dd.x for _, p in input_shards(inputs) for dd in decode_shard(p, 32)])
        with c.threads(1):
            gemm1 = gemm_flops_per_s()
            per_img = {b: flops_per_image_forward(unet, b) for b in s["batches"]}
            bare = {b: bare_loop(unet, x0, b, s["steps"]) for b in s["batches"]}
        with c.threads(os.cpu_count() or 1):
            gemm_all = gemm_flops_per_s()
        c.ray_session(2)
        try:
            for b in s["batches"]:
                summary, wall = c.restyle(inputs, str(tmp / f"util_b{b}"), models, T0, s["steps"], s["steps"], b,
                                          actors=1)
                evals = summary["inv_evals"] + summary["gen_evals"]
                inside = c.inside_seconds(summary)
                achieved = per_img[b] * evals / inside
                bare_s, bare_evals = bare[b]
                bare_rate = per_img[b] * bare_evals / bare_s
                rows.append({"batch": b, "images": summary["n_images"], "unet_evals": evals,
                             "mflop_per_image_forward": round(per_img[b] / 1e6, 2), "inside_s": round(inside, 3),
                             "restyle_gflop_s": round(achieved / 1e9, 2), "bare_loop_s": round(bare_s, 3),
                             "bare_gflop_s": round(bare_rate / 1e9, 2), "gemm_gflop_s_1thread": round(gemm1 / 1e9, 2),
                             "restyle_vs_gemm": round(achieved / gemm1, 3), "bare_vs_gemm": round(bare_rate / gemm1, 3),
                             "restyle_vs_bare": round(achieved / bare_rate, 3),
                             "unet_share": summary["unet_share"]})
                ratios[f"restyle_vs_gemm_b{b}"] = achieved / gemm1
                ratios[f"bare_vs_gemm_b{b}"] = bare_rate / gemm1
                ratios[f"unet_share_b{b}"] = summary["unet_share"]  # item 2 of issue 28: goal >= 0.9 at b32
            overlap = overlap_rows(c.toy_shards(tmp / "overlap", s["overlap_images"], s["overlap_images"]), tmp,
                                   models, s)
            for r in overlap:
                ratios[f"unet_share_b{r['batch']}_s{r['steps']}_depth{r['io_depth']}"] = r["unet_share"]
        finally:
            c.ray_stop()
    ratios["gemm_all_threads_over_1thread"] = gemm_all / gemm1
    return {"settings": {**s, "machine": c.machine(), "t0": T0, "n_inv_steps": s["steps"], "n_gen_steps": s["steps"],
                         "model": "toy_shapes (bundled toy UNet, 1.1 M params, 32x32)",
                         "gemm": f"fp32 {GEMM_N}^3 matmul, best of 5; 1 thread {gemm1 / 1e9:.1f} GFLOP/s, "
                                 f"{os.cpu_count()} threads {gemm_all / 1e9:.1f} GFLOP/s",
                         "restyle": "1 actor, 0.5 CPU, 1 torch thread; one shard of all images"},
            "tables": {"UNet FLOP/s vs GEMM (item 7)": rows,
                       "UNet share, each step in turn (io_depth 0) vs overlapped (2)": overlap}, "ratios": ratios}


def overlap_rows(inputs: str, tmp: Path, models: list[str], s: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch (8, 32) and step count (the suite's, 2): the UNet share and images/s of one actor restyling
    ``inputs`` with its lanes off (``io_depth`` 0) and on (2), one after the other in this process's Ray session."""
    rows = []
    for b in [x for x in s["batches"] if x >= 8]:
        for steps in sorted({s["steps"], 2}, reverse=True):
            for depth in (0, 2):
                summary, _ = c.restyle(inputs, str(tmp / f"ov_b{b}_s{steps}_d{depth}"), models, T0, steps, steps, b,
                                       actors=1, io_depth=depth)
                inside = c.inside_seconds(summary)
                rows.append({"batch": b, "steps": steps, "io_depth": depth, "images": summary["n_images"],
                             "inside_s": round(inside, 3), "images_per_s": round(summary["n_images"] / inside, 2),
                             "unet_share": summary["unet_share"]})
    return rows
