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
from pathlib import Path
from typing import Any

import torch

from . import _common as c

PEAKS = {  # dense TFLOP/s: (bf16 tensor cores, tf32 tensor cores); vendor data sheets (SXM parts)
    "H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12), "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12), "A10": (125e12, 62.5e12),
}
BATCHES = (1, 8, 32)
STEPS = 20


def need_gpu() -> str:
    """The CUDA device's name; exits 2 with one line when there is none."""
    if not torch.cuda.is_available():
        print("error: make bench-gpu needs a CUDA GPU and torch.cuda.is_available() is False here; run it on a "
              "GPU machine (the CPU suites are `make bench`)", file=sys.stderr)
        raise SystemExit(2)
    return torch.cuda.get_device_name(0)


def _sync_time(fn: Any, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def device_peaks(name: str) -> tuple[float, float, str]:
    """``(bf16 peak, tf32 peak, where from)`` in FLOP/s for device ``name``."""
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks[0], peaks[1], f"data sheet ({key})"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = _sync_time(lambda: a @ a)
    gemm = 2 * 8192**3 / seconds
    return gemm, gemm / 2, "measured 8192^3 bf16 GEMM (unknown device)"


def forward_section(name: str) -> list[dict[str, Any]]:
    """Section 1: full-size UNet forwards, bf16 and fp32, batch 1/8/32, with MFU."""
    from .flops_bench import forward_flops, unet_of

    bf16_peak, tf32_peak, source = device_peaks(name)
    unet = unet_of("celeba_hq", "cuda")
    meta = unet_of("celeba_hq", "meta")
    rows = []
    for batch in BATCHES:
        flops = forward_flops(meta, batch, 256)
        x = torch.randn(batch, 3, 256, 256, device="cuda")
        t = torch.full((batch,), 500, device="cuda", dtype=torch.long)
        for dtype, peak in (("bf16", bf16_peak), ("fp32", tf32_peak)):
            def fwd(dtype: str = dtype, x: torch.Tensor = x, t: torch.Tensor = t) -> None:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    unet(x, t)
            seconds = _sync_time(fwd)
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


def restyle_section(tmp: Path, n_images: int) -> list[dict[str, Any]]:
    """Section 2: full-size restyle on the GPU through Ray, fresh vs cached latents."""
    from .flops_bench import unet_of

    model = tmp / "celeba_random"
    unet_of("celeba_hq").save_pretrained(model)
    ft = tmp / "ft"
    unet_of("celeba_hq").save_pretrained(ft)
    (ft / "dclip.json").write_text(json.dumps({"base_model": str(model), "config": {"t0": 400}}))
    inputs = c.toy_shards(tmp, n_images, 16, seed=5)
    steps = ["--n-inv", str(STEPS)]
    rows = []
    start = time.perf_counter()
    pre = _cli("precompute", "--model", str(model), "--input", inputs, "--out", str(tmp / "lat"), "--t0", "400",
               *steps, "--gpus-per-task", "1", "--batch-size", "16")
    rows.append({"run": "precompute (latents, once)", "images": pre["n_images"], "wall_s": round(time.perf_counter() - start, 1),
                 "edits_per_s": ""})
    for kind, extra in (("fresh latents", []), ("cached latents", ["--latents", str(tmp / "lat")])):
        start = time.perf_counter()
        res = _cli("restyle", "--input", inputs, "--out", str(tmp / kind.split()[0]), "--model", str(ft), "--base", str(model),
                   *steps, "--n-gen", str(STEPS), "--t0", "400", "--gpus-per-actor", "1", "--batch-size", "16", *extra)
        wall = time.perf_counter() - start
        rows.append({"run": f"restyle, {kind}", "images": res["n_images"], "wall_s": round(wall, 1),
                     "edits_per_s": round(res["n_images"] / wall, 2)})
    return rows


def finetune_section(tmp: Path) -> list[dict[str, Any]]:
    """Section 3: finetune-many, two toy prompts at once on the GPU."""
    prompts = tmp / "prompts.txt"
    prompts.write_text("red circle -> blue circle name=blue\nred circle -> green circle name=green\n")
    images = c.toy_shards(tmp, 32, 16, seed=1)
    start = time.perf_counter()
    res = _cli("finetune-many", str(prompts), "--model", "toy_shapes", "--images", images, "--out", str(tmp / "models"),
               "--gpus-per-prompt", "0.5")
    wall = time.perf_counter() - start
    return [{"prompt": p.get("name"), "status": p.get("status"), "seconds": p.get("seconds"),
             "final_loss": p.get("final_loss"), "job_wall_s": round(wall, 1)} for p in res.get("prompts", [])]


def main(argv: list[str] | None = None) -> int:
    """Run the GPU sections; returns the exit code (2 without a GPU, 1 when a section failed)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench")
    parser.add_argument("--out", default="bench-gpu-out")
    parser.add_argument("--images", type=int, default=64, help="images restyled at full size")
    args = parser.parse_args(argv)
    name = need_gpu()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "sections": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as d:
        tmp = Path(d)
        for section, fn in (("forward", lambda: forward_section(name)), ("restyle", lambda: restyle_section(tmp, args.images)),
                            ("finetune-many", lambda: finetune_section(tmp))):
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
