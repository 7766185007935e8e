"""Fine-tuning: seconds per prompt and peak memory, efficient vs full mode (toy world, CPU).

Peak memory is the growth of the process's peak RSS during training over its value after the models
are loaded and warmed up, each configuration in a fresh subprocess (2 torch threads) so the numbers do
not mix. Rows: one toy prompt end to end in efficient mode (the issue-5 goal: <= 60 s on 2 cores),
the circle -> square setting in full mode, then one epoch of each mode at batch 1 and 8.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dclip_ray.demo import DEMO_TRAIN
from dclip_ray.diffusion import schedule_from_config
from dclip_ray.edit import invert_images
from dclip_ray.finetune import FinetuneConfig, finetune
from dclip_ray.models import eps_fn_of, load_clip, load_schedule_config, load_unet
from dclip_ray.toyworld import sample_dataset


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(mode: str, batch_size: int, n_images: int, epochs: int, n_gen: int, threads: int = 2) -> dict:
    """One fine-tuning run in this process: seconds (inversion and training) and peak-RSS growth (MB)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = load_unet("toy_shapes")
    sched = schedule_from_config(load_schedule_config("toy_shapes"))
    clip = load_clip("toy_clip")
    samples = sample_dataset(n_images, seed=101, colours=["red"], shapes=["circle"])
    x0 = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    t = time.perf_counter()
    lat = invert_images(eps_fn_of(unet), x0, 500, 40, sched)
    t_inv = time.perf_counter() - t
    cfg = FinetuneConfig(source="red circle", target="blue circle",
                         **{**DEMO_TRAIN, "n_gen_steps": n_gen, "mode": mode, "epochs": epochs, "batch_size": batch_size})
    finetune(unet, clip, x0[:batch_size], lat[:batch_size], sched,
             FinetuneConfig(**{**cfg.__dict__, "epochs": 1}))  # warm-up: allocator and kernels
    base = _rss_mb()
    t = time.perf_counter()
    res = finetune(unet, clip, x0, lat, sched, cfg)
    t_ft = time.perf_counter() - t
    return {"mode": mode, "batch": batch_size, "images": n_images, "epochs": epochs, "n_gen": n_gen,
            "invert_s": round(t_inv, 2), "train_s": round(t_ft, 2), "s_per_epoch": round(t_ft / epochs, 2),
            "peak_rss_growth_mb": round(_rss_mb() - base, 1), "final_loss": round(res.final_loss, 4)}


def _subprocess(*args: object) -> dict:
    """Run :func:`measure` (mode, batch, images, epochs, n_gen) in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.finetune_bench", *map(str, args)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(out_dir: Path | None = None, quick: bool = False) -> list[dict]:
    """One toy prompt end to end (efficient, S_gen 6; full, S_gen 10), then efficient vs full for one
    epoch at batch 1 and 8. ``quick``: 4 images, 1 epoch, batch 1 only (numbers not meaningful).
    ``out_dir`` is unused (the runner's suite signature); the rows are returned."""
    n, epochs, batches = (4, 1, (1,)) if quick else (16, 5, (1, 8))
    rows = [_subprocess("efficient", 1, n, epochs, 6),  # the acceptance setting: one toy prompt end to end
            _subprocess("full", 1, n, epochs, 10)]  # the circle -> square setting's mode and steps
    by = {(r["mode"], r["batch"], r["epochs"], r["n_gen"]): r for r in rows}
    for batch in batches:
        for mode in ("efficient", "full"):
            if (mode, batch, 1, 6) not in by:  # quick mode's first row already is this one
                by[(mode, batch, 1, 6)] = _subprocess(mode, batch, n, 1, 6)
                rows.append(by[(mode, batch, 1, 6)])
    for batch in batches:
        eff, full = by[("efficient", batch, 1, 6)], by[("full", batch, 1, 6)]
        ratio = eff["peak_rss_growth_mb"] / max(full["peak_rss_growth_mb"], 1e-6)
        rows.append({"mode": "efficient/full", "batch": batch, "images": n, "epochs": 1, "n_gen": 6,
                     "invert_s": "", "train_s": round(eff["train_s"] / full["train_s"], 3), "s_per_epoch": "",
                     "peak_rss_growth_mb": round(ratio, 3), "final_loss": ""})
    return rows


if __name__ == "__main__":
    mode, batch, n, epochs, n_gen = sys.argv[1], *map(int, sys.argv[2:6])
    print(json.dumps(measure(mode, batch, n, epochs, n_gen)))
