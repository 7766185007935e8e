"""The GPU check (issue 22 item 5): `make bench-gpu` (``python -m benchmarks.gpu_bench``), under 8 minutes
on one GPU. Without a CUDA GPU it fails at once with one line (exit 2).

Sections (each runs on its own; a failing one is reported in the results and the next one runs):

1. ``forward``: the full-size ``celeba_hq`` UNet (random weights, 256x256) forward throughput in bf16
   (autocast) and fp32 at batch 1, 8 and 32 (best of 3 timed runs after a warm-up, CUDA-synchronised),
   with MFU: FLOPs per forward (FlopCounterMode) x forwards/s over the device's dense peak (bf16 tensor
   cores for bf16; TF32 for fp32, which cuDNN convolutions use by default). The peak comes from a table
   of known devices, else from a measured 8192^3 bf16 GEMM (then MFU is against what the GEMM reaches).
2. ``restyle``: edits/s at full size (one fine-tuned model, S_inv = S_gen = 20, batch 16) through the
   Ray pipeline with ``--gpus-per-actor 1``: fresh latents (inverted in the actor) and cached latents
   (``precompute --gpus-per-task 1`` first; its time is reported).
3. ``finetune-many``: two toy prompts (red -> blue, red -> green circle) fine-tuned at once on the GPU
   (``--gpus-per-prompt 0.5``), seconds per prompt.

Results: a table per section on stdout and ``results.json`` under ``--out`` (default ``bench-gpu-out``).

``--cpu``: the rehearsal (issue 28 item 4), so the day a GPU is there the check measures instead of
failing on code. The same sections and code paths at tiny size on the CPU: the same UNet architecture
at 32x32, bf16 autocast on the CPU, batches 1 and 8, MFU against a measured fp32 GEMM; the CLI calls
with the same GPU options, Ray started with a logical GPU (``RAY_OVERRIDE_RESOURCES``) and
``DCLIP_RAY_ACCELERATOR=cpu`` mapping it to the CPU; 8 images at 4 steps; finetune-many for 1 epoch.
The slow suite runs it (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _common as c

PEAKS = {  # dense TFLOP/s: (bf16 tensor cores, tf32 tensor cores); vendor data sheets (SXM parts)
    "H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12), "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12), "A10": (125e12, 62.5e12),
}


@dataclass(frozen=True)
class Mode:
    """Where and at what size the check runs: the GPU for real, or the CPU rehearsal (``--cpu``)."""

    device: str
    resolution: int
    batches: tuple[int, ...]
    steps: int
    finetune_args: tuple[str, ...] = ()


GPU = Mode("cuda", 256, (1, 8, 32), 20)
CPU = Mode("cpu", 32, (1, 8), 4, ("--epochs", "1"))
REHEARSAL_ENV = {"RAY_OVERRIDE_RESOURCES": json.dumps({"GPU": 1}), "DCLIP_RAY_ACCELERATOR": "cpu"}
"""The environment of the CPU rehearsal: Ray's nodes get one logical GPU, which the workers map to the CPU."""


def need_gpu() -> str:
    """The CUDA device's name; exits 2 with one line when there is none."""
    if not torch.cuda.is_available():
        print("error: make bench-gpu needs a CUDA GPU and torch.cuda.is_available() is False here; run it on a "
              "GPU machine (the CPU suites are `make bench`)", file=sys.stderr)
        raise SystemExit(2)
    return torch.cuda.get_device_name(0)


def _sync_time(fn: Any, reps: int = 3, device: str = "cuda") -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def device_peaks(name: str, mode: Mode = GPU) -> tuple[float, float, str]:
    """``(bf16 peak, tf32 peak, where from)`` in FLOP/s for device ``name`` (on the CPU: a measured
    1024^3 fp32 GEMM for both)."""
    if mode.device == "cpu":
        a = torch.randn(1024, 1024)
        gemm = 2 * 1024**3 / _sync_time(lambda: a @ a, device="cpu")
        return gemm, gemm, "measured 1024^3 fp32 GEMM on the CPU (rehearsal)"
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks[0], peaks[1], f"data sheet ({key})"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = _sync_time(lambda: a @ a)
    gemm = 2 * 8192**3 / seconds
    return gemm, gemm / 2, "measured 8192^3 bf16 GEMM (unknown device)"


def unet_at(device: str, resolution: int) -> torch.nn.Module:
    """The ``celeba_hq`` UNet architecture (random weights) for ``resolution``-pixel inputs on ``device``."""
    from diffusers import UNet2DModel

    from .flops_bench import unet_of

    if resolution == 256:
        return unet_of("celeba_hq", device)
    cfg = dict(unet_of("celeba_hq", "meta").config)
    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DModel.from_config({**cfg, "sample_size": resolution}).eval()


def forward_section(name: str, mode: Mode = GPU) -> list[dict[str, Any]]:
    """Section 1: UNet forwards, bf16 and fp32, at each of the mode's batches, with MFU."""
    from .flops_bench import forward_flops

    bf16_peak, tf32_peak, source = device_peaks(name, mode)
    dev, res = mode.device, mode.resolution
    unet = unet_at(dev, res)
    meta = unet_at("meta", res)
    rows = []
    for batch in mode.batches:
        flops = forward_flops(meta, batch, res)
        x = torch.randn(batch, 3, res, res, device=dev)
        t = torch.full((batch,), 500, device=dev, dtype=torch.long)
        for dtype, peak in (("bf16", bf16_peak), ("fp32", tf32_peak)):
            def fwd(dtype: str = dtype, x: torch.Tensor = x, t: torch.Tensor = t) -> None:
                with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    unet(x, t)
            seconds = _sync_time(fwd, device=dev)
            rows.append({"dtype": dtype, "batch": batch, "ms_per_forward": round(seconds * 1e3, 2),
                         "images_per_s": round(batch / seconds, 1), "gflop_per_forward": round(flops / 1e9, 1),
                         "tflop_per_s": round(flops / seconds / 1e12, 1), "mfu": round(flops / seconds / peak, 3),
                         "peak": source})
    return rows


def _cli(*args: str) -> dict[str, Any]:
    exe = str(Path(sys.executable).with_name("dclip-ray"))  # the venv's entry point
    out = subprocess.run([exe, *args, "--json", "--quiet"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"dclip-ray {args[0]} exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def restyle_section(tmp: Path, n_images: int, mode: Mode = GPU) -> list[dict[str, Any]]:
    """Section 2: restyle on the GPU through Ray, fresh vs cached latents."""
    model = tmp / "celeba_random"
    unet_at("cpu", mode.resolution).save_pretrained(model)
    ft = tmp / "ft"
    unet_at("cpu", mode.resolution).save_pretrained(ft)
    (ft / "dclip.json").write_text(json.dumps({"base_model": str(model), "config": {"t0": 400}}))
    inputs = c.toy_shards(tmp, n_images, 16, seed=5)
    steps = ["--n-inv", str(mode.steps)]
    rows = []
    start = time.perf_counter()
    pre = _cli("precompute", "--model", str(model), "--input", inputs, "--out", str(tmp / "lat"), "--t0", "400",
               *steps, "--gpus-per-task", "1", "--batch-size", "16")
    rows.append({"run": "precompute (latents, once)", "images": pre["n_images"], "wall_s": round(time.perf_counter() - start, 1),
                 "edits_per_s": ""})
    for kind, extra in (("fresh latents", []), ("cached latents", ["--latents", str(tmp / "lat")])):
        start = time.perf_counter()
        res = _cli("restyle", "--input", inputs, "--out", str(tmp / kind.split()[0]), "--model", str(ft), "--base", str(model),
                   *steps, "--n-gen", str(mode.steps), "--t0", "400", "--gpus-per-actor", "1", "--batch-size", "16", *extra)
        wall = time.perf_counter() - start
        rows.append({"run": f"restyle, {kind}", "images": res["n_images"], "wall_s": round(wall, 1),
                     "edits_per_s": round(res["n_images"] / wall, 2)})
    return rows


def finetune_section(tmp: Path, mode: Mode = GPU) -> list[dict[str, Any]]:
    """Section 3: finetune-many, two toy prompts at once on the GPU."""
    prompts = tmp / "prompts.txt"
    prompts.write_text("red circle -> blue circle name=blue\nred circle -> green circle name=green\n")
    images = c.toy_shards(tmp, 256, 64, seed=1)  # mixed renders: each prompt trains on its ~28 red circles
    start = time.perf_counter()
    res = _cli("finetune-many", str(prompts), "--model", "toy_shapes", "--images", images, "--out", str(tmp / "models"),
               "--gpus-per-prompt", "0.5", *mode.finetune_args)
    wall = time.perf_counter() - start
    return [{"prompt": p.get("name"), "status": p.get("status"), "seconds": p.get("seconds"),
             "final_loss": p.get("final_loss"), "job_wall_s": round(wall, 1)} for p in res.get("prompts", [])]


def main(argv: list[str] | None = None) -> int:
    """Run the GPU sections; returns the exit code (2 without a GPU, 1 when a section failed)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench")
    parser.add_argument("--out", default="bench-gpu-out")
    parser.add_argument("--images", type=int, default=None, help="images restyled (default: 64, --cpu 8)")
    parser.add_argument("--cpu", action="store_true", help="the rehearsal: every section at tiny size on the CPU")
    args = parser.parse_args(argv)
    mode = CPU if args.cpu else GPU
    n_images = args.images or (8 if args.cpu else 64)
    if args.cpu:
        name = "cpu (rehearsal)"
        os.environ.update(REHEARSAL_ENV)  # the CLI calls' Ray gets a logical GPU, mapped to the CPU
    else:
        name = need_gpu()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[str, Any] = {"device": name, "mode": mode.device, "torch": torch.__version__, "sections": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as d:
        tmp = Path(d)
        for section, fn in (("forward", lambda: forward_section(name, mode)),
                            ("restyle", lambda: restyle_section(tmp, n_images, mode)),
                            ("finetune-many", lambda: finetune_section(tmp, mode))):
            start = time.perf_counter()
            try:
                rows = fn()
                results["sections"][section] = {"rows": rows, "seconds": round(time.perf_counter() - start, 1)}
            except Exception as e:  # noqa: BLE001  (reported; the next section still runs)
                failed = True
                results["sections"][section] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            print(f"== {section}: {json.dumps(results['sections'][section].get('rows', results['sections'][section].get('error')), indent=1)}",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
