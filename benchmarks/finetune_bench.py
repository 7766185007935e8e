"""Fine-tuning: seconds per prompt and peak memory, efficient vs full mode (toy world, CPU).

Memory, primary measure: the peak of the bytes the autograd graph holds for backward
(``saved_mb``), counted by :class:`SavedTensorMeter` through ``torch.autograd.graph.saved_tensors_hooks``
over the whole run: every tensor an operation saves for its backward is counted while it is held (each
storage once; the model's parameters, which exist in either mode, not at all). It is deterministic and
cannot read 0 for a run that trains. Secondary: the growth of the process's peak RSS over its current
RSS after the models are loaded and the latents inverted (``peak_rss_growth_mb``), each configuration
in a fresh subprocess (2 torch threads) so the numbers do not mix. It is noisy (the allocator keeps what
it once touched, so a warm-up would hide the graph: there is none) and is reported, not compared.
Rows: one toy prompt end to end in efficient mode (the issue-5 goal: <= 60 s on 2 cores), the circle ->
square setting in full mode, then one epoch of each mode at batch 1 and 8, then their ratios.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dclip_ray.demo import DEMO_TRAIN
from dclip_ray.diffusion import schedule_from_config
from dclip_ray.edit import invert_images
from dclip_ray.finetune import FinetuneConfig, finetune
from dclip_ray.models import eps_fn_of, load_clip, load_schedule_config, load_unet
from dclip_ray.toyworld import sample_dataset


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _Held:
    """One saved tensor, as packed by :class:`SavedTensorMeter`; releases its count when autograd drops it."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int | None, meter: SavedTensorMeter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward while they are held: ``live`` now, ``peak`` the most.

    A context manager installing ``torch.autograd.graph.saved_tensors_hooks``. Each storage is counted
    once however many operations save it (views included); parameters and views of them (the weights,
    held in either mode, trained or frozen) are not counted. ``packed`` is how many tensors were saved in all.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.packed = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [bytes, holders]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Held:
        self.packed += 1
        base = tensor._base if tensor._base is not None else tensor  # a weight is often saved as a view (w.t())
        if isinstance(base, torch.nn.Parameter):
            return _Held(tensor, None, self)
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        ref = self._refs.setdefault(key, [storage.nbytes(), 0])
        if ref[1] == 0:
            self.live += ref[0]
            self.peak = max(self.peak, self.live)
        ref[1] += 1
        return _Held(tensor, key, self)

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def _release(self, key: int) -> None:
        ref = self._refs[key]
        ref[1] -= 1
        if ref[1] == 0:
            self.live -= ref[0]
            del self._refs[key]

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def measure(mode: str, batch_size: int, n_images: int, epochs: int, n_gen: int, threads: int = 2,
            adapter: str = "full", rank: int = 8) -> dict:
    """One fine-tuning run in this process: seconds (inversion and training), the peak of the bytes saved
    for backward (``saved_mb``) and the peak-RSS growth over the RSS before training (MB). ``adapter``:
    ``full`` or ``lora`` (of ``rank``; then also the trainable parameters)."""
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
                         **{**DEMO_TRAIN, "n_gen_steps": n_gen, "mode": mode, "epochs": epochs, "batch_size": batch_size,
                            "adapter": adapter, "lora_rank": rank})
    base = _current_rss_mb()  # no warm-up: the graph's memory must not already be touched
    t = time.perf_counter()
    with SavedTensorMeter() as meter:
        res = finetune(unet, clip, x0, lat, sched, cfg)
    t_ft = time.perf_counter() - t
    trainable = sum(p.numel() for p in res.unet.parameters() if p.requires_grad) if adapter == "lora" else \
        sum(p.numel() for p in res.unet.parameters())
    return {"mode": mode, "adapter": adapter, "trainable_params": trainable, "batch": batch_size, "images": n_images,
            "epochs": epochs, "n_gen": n_gen,
            "invert_s": round(t_inv, 2), "train_s": round(t_ft, 2), "s_per_epoch": round(t_ft / epochs, 2),
            "saved_mb": round(meter.peak / 2**20, 3), "peak_rss_growth_mb": round(_peak_rss_mb() - base, 1),
            "final_loss": round(res.final_loss, 4)}


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
        rss = eff["peak_rss_growth_mb"] / full["peak_rss_growth_mb"] if full["peak_rss_growth_mb"] > 0 else None
        rows.append({"mode": "efficient/full", "batch": batch, "images": n, "epochs": 1, "n_gen": 6,
                     "invert_s": "", "train_s": round(eff["train_s"] / full["train_s"], 3), "s_per_epoch": "",
                     "saved_mb": round(eff["saved_mb"] / full["saved_mb"], 4),
                     "peak_rss_growth_mb": round(rss, 3) if rss is not None else "", "final_loss": ""})
    return rows


if __name__ == "__main__":
    mode, batch, n, epochs, n_gen = sys.argv[1], *map(int, sys.argv[2:6])
    adapter = sys.argv[6] if len(sys.argv) > 6 else "full"
    print(json.dumps(measure(mode, batch, n, epochs, n_gen, adapter=adapter)))
