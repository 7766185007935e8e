"""Shared test inputs: toy shards with bad members, tiny random UNets, a random toy-architecture CLIP."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import open_clip
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

from dclip_ray.toyworld import toy_clip_paths
from dclip_ray.toyworld.data import write_shards

SCHED = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
         "beta_schedule": "linear"}

BAD_REASONS = {"zero": "zero-byte", "trunc": "truncated image", "link": "not a regular file", "noimg": "no image member"}


def tree(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), sorted: compares two output trees byte for byte."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return dict(sorted(out.items()))


def stamps(folder) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (relative path -> (mtime_ns, size)): equal before and after a command
    means the command wrote nothing there (no training run, no checkpoint, no rewritten card)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), folder)] = (st.st_mtime_ns, st.st_size)
    return dict(sorted(out.items()))


def random_clip_weights(folder: Path) -> str:
    """The toy CLIP architecture with random weights (seed 0), saved as safetensors; returns the path."""
    name, config_folder, _ = toy_clip_paths()
    open_clip.add_model_config(config_folder)
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    path = folder / "random_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


# `dclip-ray ARGV` in a fresh interpreter with one function replaced by a sleep that first touches a file
SLOW_DRIVER = """
import importlib, pathlib, sys, time
ready, target, argv = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
module, name = target.rsplit(".", 1)
def slow(*args, **kwargs):
    ready.write_text("ready")
    time.sleep(300)
setattr(importlib.import_module(module), name, slow)
from dclip_ray.cli import main
sys.exit(main(argv))
"""


def interrupted_run(tmp_path, target: str, argv: list[str], sig: int) -> tuple[int, str, str]:
    """Run ``dclip-ray ARGV`` in a subprocess (cwd ``tmp_path``) whose function ``target`` (``module.name``)
    sleeps; send ``sig`` once it sleeps. Returns ``(exit code, stdout, stderr)``."""
    ready = tmp_path / "ready"
    for opt in ("--input", "--images", "--finetuned"):  # the CLI refuses a missing input before it starts
        if opt in argv:
            (tmp_path / argv[argv.index(opt) + 1]).mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, str(ready), target, *argv], cwd=str(tmp_path),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never reached its slow step"
            time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def make_world(root: Path, t0: int) -> dict:
    """Toy input shards (with bad members), a random base UNet and 3 random "fine-tuned" UNets."""
    torch.set_num_threads(1)
    data, keys = make_inputs(root)
    base = tiny_unet_dir(root / "base", 0)
    fts = [tiny_unet_dir(root / f"ft{i}", i, {"base_model": base, "config": {"t0": t0}}) for i in (1, 2, 3)]
    return {"root": root, "data": data, "keys": keys, "base": base, "fts": fts}


def tiny_models(root: Path, t0: int) -> dict[str, str]:
    """``{"base", "ft"}``: a random tiny base UNet and a random "fine-tuned" one whose card names it and ``t0``."""
    torch.set_num_threads(1)
    base = tiny_unet_dir(root / "base", 0)
    return {"base": base, "ft": tiny_unet_dir(root / "ft", 1, {"base_model": base, "config": {"t0": t0}})}


def tiny_unet_dir(path: Path, seed: int, card: dict | None = None) -> str:
    """A random 32x32 UNet2DModel saved as a diffusers folder (+ scheduler config, optional dclip.json)."""
    torch.manual_seed(seed)
    m = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                    norm_num_groups=8)
    m.save_pretrained(path)
    (path / "scheduler_config.json").write_text(json.dumps(SCHED))
    if card is not None:
        (path / "dclip.json").write_text(json.dumps(card))
    return str(path)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_inputs(root: Path, n: int = 16, shard_size: int = 8, cut: bool = False) -> tuple[str, dict[str, list[str]]]:
    """Toy shards ``00000..`` plus ``bad.tar`` (2 good keys, 4 bad ones) and, with ``cut``, ``cut.tar``
    (truncated inside its second member: an unreadable shard, never committed; tests/test_hostile.py).

    Returns (input folder, {shard: keys in order}).
    """
    data = root / "data"
    write_shards(str(data), n, seed=0, shard_size=shard_size)
    good = (data / "00000.tar")
    with tarfile.open(good) as t:
        png = t.extractfile("0_000000.png").read()
        png2 = t.extractfile("0_000001.png").read()
    with tarfile.open(data / "bad.tar", "w") as tar:
        _add(tar, "ok1.png", png)
        _add(tar, "ok1.txt", b"a caption")
        _add(tar, "zero.png", b"")
        _add(tar, "trunc.png", png[: len(png) // 2])
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _add(tar, "noimg.txt", b"only a caption")
        _add(tar, "ok2.png", png2)
    keys = {f"{i:05d}": [f"0_{j:06d}" for j in range(i * shard_size, min(n, (i + 1) * shard_size))]
            for i in range((n + shard_size - 1) // shard_size)}
    keys["bad"] = ["ok1", "zero", "trunc", "link", "noimg", "ok2"]
    if cut:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            _add(tar, "c1.png", png)
            _add(tar, "c2.png", png2 * 40)
            _add(tar, "c3.png", png)
        (data / "cut.tar").write_bytes(buf.getvalue()[: 512 * 3 + len(png) + 700])
        keys["cut"] = ["c1", "c2"]
    return str(data), keys


def write_shards_like(path: str, seed: int) -> None:
    """Rewrite the tar at ``path`` in place with the same member names and other image bytes (an input
    that changed under the same keys)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    with tarfile.open(path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            if name.endswith(".png"):
                arr = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                blob = buf.getvalue()
            _add(tar, name, blob)
