"""Streaming memory: peak RSS of a restyle over 20,000 vs 2,000 toy images (issue 10 item 4; goal <= 1.2).

Each size runs in its own subprocess (embedded Ray, 2 logical CPUs, 2 actors of 0.5 CPU), which
samples every 0.2 s the resident memory of itself and all its descendants (Ray's GCS, raylet, the
Ray Data workers and actors) from ``/proc``; the figure is the largest sum seen. Ray's object store
pages count in each process that touched them, so the absolute value overstates the machine's use; the
ratio between sizes is what the goal is about. To keep the run affordable the edit is cheap: a random
0.16 M-parameter 32x32 UNet (channels 16/32) as base and "fine-tuned" model, t0 = 100, S_inv = S_gen = 2
(1 + 2 UNet calls per image): memory, not quality, is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _common as c

T0, N_INV, N_GEN = 100, 2, 2


def settings(quick: bool) -> dict[str, Any]:
    """Sizes of one run: full (``make bench``) or quick (smoke test)."""
    if quick:
        return {"sizes": [200, 1000], "shard_size": 100, "batch": 50, "actors": 2}
    return {"sizes": [2000, 20000], "shard_size": 1000, "batch": 100, "actors": 2}


def measure(inputs: str, out: str, batch: int, actors: int) -> dict[str, Any]:
    """In this process: start Ray, restyle ``inputs`` with the toy UNet, return the peak RSS (MB) of the
    process tree, its value after Ray started, the wall time and the image count."""
    models = c.tiny_unet_pair(Path(out).parent, T0)
    c.ray_session(2)
    try:
        with c.TreeRssSampler() as idle:
            time.sleep(0.5)
        with c.TreeRssSampler() as s:
            summary, wall = c.restyle(inputs, out, models, T0, N_INV, N_GEN, batch, actors=actors)
    finally:
        c.ray_stop()
    return {"images": summary["n_images"], "wall_s": round(wall, 2), "peak_tree_rss_mb": round(s.peak / 2**20, 1),
            "after_ray_init_mb": round(idle.peak / 2**20, 1), "samples": s.samples,
            "unet_evals": summary["inv_evals"] + summary["gen_evals"]}


def _subprocess(inputs: str, out: str, batch: int, actors: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_bench", inputs, out, str(batch), str(actors)],
                          capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    if proc.returncode != 0:
        raise RuntimeError(f"memory_bench child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Peak process-tree RSS of a restyle at two dataset sizes; the ratio large/small."""
    del out_dir
    s = settings(quick)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as d:
        tmp = Path(d)
        for n in s["sizes"]:
            inputs = c.toy_shards(tmp, n, s["shard_size"])
            r = _subprocess(inputs, str(tmp / f"out_{n}" / "restyled"), s["batch"], s["actors"])
            rows.append({"images": n, **r})
    small, large = rows[0], rows[-1]
    ratio = large["peak_tree_rss_mb"] / small["peak_tree_rss_mb"]
    growth = (large["peak_tree_rss_mb"] - large["after_ray_init_mb"]) / max(
        small["peak_tree_rss_mb"] - small["after_ray_init_mb"], 1e-6)
    rows.append({"images": f"{large['images']}/{small['images']}", "wall_s": round(large["wall_s"] / small["wall_s"], 3),
                 "peak_tree_rss_mb": round(ratio, 3), "after_ray_init_mb": "", "samples": "", "unet_evals": ""})
    return {"settings": {**s, "machine": c.machine(), "model": "random tiny UNet (16/32 channels, 0.16 M params, 32x32) on toy-world images",
                         "t0": T0, "n_inv_steps": N_INV, "n_gen_steps": N_GEN,
                         "measure": "peak RSS of driver + all Ray processes (/proc, every 0.2 s), one subprocess per size"},
            "tables": {"streaming memory (item 4)": rows},
            "ratios": {"peak_rss_large_over_small": ratio, "peak_growth_over_ray_large_over_small": growth}}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
