"""Shared helpers of the benchmark suites: the machine, the toy world inputs, the process-tree RSS sampler.

The model of every pipeline benchmark is the bundled toy UNet (``toy_shapes``, 1.1 M parameters,
32x32). Its "fine-tuned" models are copies of the same weights in their own folders (``ft1``..``ftK``,
with a ``dclip.json`` card naming the base and t0): a fine-tuned model has the base's architecture,
so its speed is the base's speed, and no fine-tuning time is spent before a speed measurement.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TOY_MODEL = "toy_shapes"


def machine() -> dict[str, Any]:
    """The machine a table was measured on: CPU count, torch threads, load average, versions."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1_5_15": load,
            "torch": torch.__version__, "platform": platform.platform(), "python": platform.python_version()}


def toy_unet_dir() -> str:
    """The bundled toy UNet's diffusers folder."""
    from dclip_ray.models.presets import get_preset

    path = get_preset(TOY_MODEL).weights_path()
    assert path is not None
    return path


def finetuned_copies(root: Path, k: int, t0: int) -> list[str]:
    """``k`` "fine-tuned" model folders ``root/ft1..ftk``: copies of the toy UNet with a card naming the
    base (``toy_shapes``) and ``t0``. Returns their paths."""
    src = Path(toy_unet_dir())
    out = []
    for i in range(1, k + 1):
        dst = root / f"ft{i}"
        if not dst.exists():
            shutil.copytree(src, dst)
            (dst / "dclip.json").write_text(json.dumps({"base_model": TOY_MODEL, "config": {"t0": t0}}))
        out.append(str(dst))
    return out


def tiny_unet_pair(root: Path, t0: int) -> list[str]:
    """A random 0.16 M-parameter 32x32 UNet (channels 16, 32; no attention) saved as a base folder, and
    one "fine-tuned" copy whose card names it. For benchmarks of the pipeline's memory, not quality.
    Returns ``[fine-tuned folder]``."""
    from diffusers import UNet2DModel

    base, ft = root / "tiny_base", root / "tiny_ft"
    if not ft.exists():
        torch.manual_seed(0)
        m = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, add_attention=False)
        sched = (Path(toy_unet_dir()) / "scheduler_config.json").read_text()
        for folder in (base, ft):
            m.save_pretrained(folder)
            (folder / "scheduler_config.json").write_text(sched)
        (ft / "dclip.json").write_text(json.dumps({"base_model": str(base), "config": {"t0": t0}}))
    return [str(ft)]


def toy_shards(root: Path, n: int, shard_size: int, seed: int = 0) -> str:
    """Toy-world WebDataset shards of ``n`` images under ``root`` (written once); returns the folder."""
    from dclip_ray.toyworld.data import write_shards

    folder = root / f"data_{n}_{shard_size}_{seed}"
    if not (folder / ".done").exists():
        write_shards(str(folder), n, seed=seed, shard_size=shard_size, overwrite=True)  # a cache: redo a half write
        (folder / ".done").write_text("")
    return str(folder)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch intra-op threads set to ``n`` inside the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ray_session(num_cpus: int) -> None:
    """Start an embedded Ray with ``num_cpus`` logical CPUs (shut down any earlier one first)."""
    import ray

    from dclip_ray.pipeline.runtime import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=num_cpus)


def ray_stop() -> None:
    """Shut down the embedded Ray of this process (if any)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def restyle(inputs: str, out: str, models: list[str], t0: int, n_inv: int, n_gen: int, batch: int,
            actors: int = 1, cpus_per_actor: float = 0.5, latents: str | None = None,
            io_depth: int | None = None) -> tuple[dict[str, Any], float]:
    """One ``run_restyle`` of the toy world (Ray already started); ``io_depth``: the actor's decode-ahead and
    write-behind depth in batches (None: the default; 0: one step after another). Returns (summary, wall seconds)."""
    from dclip_ray.pipeline.restyle import RestyleJob, run_restyle
    from dclip_ray.stages.restyle_config import build_restyle_config

    cfg = build_restyle_config(out, models=models, t0=t0, n_inv_steps=n_inv, n_gen_steps=n_gen,
                                    batch_size=batch, latents=latents)
    if io_depth is not None:
        cfg.io_depth = io_depth
    start = time.perf_counter()
    summary = run_restyle(RestyleJob(cfg, inputs, actors=actors, cpus_per_actor=cpus_per_actor), progress=False)
    return summary, time.perf_counter() - start


def inside_seconds(summary: dict[str, Any]) -> float:
    """Seconds spent inside the restyle actors (sum over shards of the restyler's own timer)."""
    return float(sum(r.get("seconds", 0.0) for r in summary["shards"]))


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of process ``root`` and all its descendants (Linux ``/proc``), in bytes."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm") as f:
                resident = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = resident * page
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class TreeRssSampler:
    """Samples the RSS of this process and all its descendants (Ray's GCS, raylet, workers) in a thread;
    ``peak`` is the largest sum seen, in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def _loop(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(pid))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
