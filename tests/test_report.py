"""`dclip-ray report`: one self-contained HTML page for a finetune/edit folder and for a pipeline run folder,
robust to missing parts; the fine-tuning loss history and TensorBoard logging; a headless-Chromium check."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from pipeline_fixtures import make_inputs, random_clip_weights, tiny_unet_dir

from dclip_ray.cli import main
from dclip_ray.diffusion import linear_schedule
from dclip_ray.evaluation import EvalJob, evaluate
from dclip_ray.evaluation.report import CELL, plot_curves, write_report
from dclip_ray.finetune import FinetuneConfig, FinetuneResult, finetune, save_finetuned
from dclip_ray.models import load_clip
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import build_restyle_config
from dclip_ray.toyworld import sample_dataset

ROOT = Path(__file__).resolve().parents[1]


def inline_images(page: str) -> list[Image.Image]:
    """Every <img> of the page, decoded; fails when an image is not an inline PNG."""
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    return out


def assert_self_contained(page: str) -> None:
    assert not re.search(r"(src|href)=\"(https?:|//|/)", page), "no external references"
    assert "<link" not in page and "<script" not in page


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A toy `finetune` + `edit --grid` + `eval` run in one folder (tiny settings)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    images = root / "images"
    images.mkdir()
    for s in sample_dataset(4, seed=5, colours=["red"], shapes=["circle"]):
        Image.fromarray(s.image).save(images / f"{s.key}.png")
    assert main(["finetune", "--model", "toy_shapes", "--source", "red circle", "--target", "blue circle",
                 "--images", str(images), "--out", str(root / "ft"), "--n-train", "2", "--epochs", "2", "--n-inv", "5",
                 "--n-gen", "3", "--lr", "1e-5", "--aug-views", "1", "--check-images", "0", "--json"]) == 0
    assert main(["edit", "--model", "toy_shapes", "--finetuned", str(root / "ft"), "--images", str(images),
                 "--out", str(root / "edited"), "--n-inv", "8", "--n-gen", "8", "--grid", "--json"]) == 0
    evaluate(EvalJob(before=str(images), after=str(root / "edited"), source="red circle", target="blue circle",
                     clip="toy_clip", judge_colour="blue", out=str(root / "edited" / "eval.json")))
    return root


def test_report_of_a_finetune_and_edit_folder(local_run, capsys):
    card = json.loads((local_run / "ft" / "dclip.json").read_text())
    hist = card["loss_history"]
    assert len(hist["total"]) == len(hist["step"]) == 2 * 2 * 3, "2 epochs x 2 images x 3 steps, efficient mode"
    capsys.readouterr()
    rc = main(["report", str(local_run), "--json"])
    path = json.loads(capsys.readouterr().out)["report"]
    assert rc == 0 and path == str(local_run / "report.html")
    page = Path(path).read_text()
    assert_self_contained(page)
    imgs = inline_images(page)
    assert len(imgs) >= 2, "the edit's before/after grid and the loss curve"
    assert "red circle" in page and "blue circle" in page and "s_dir" in page and "judge_success" in page
    assert "final loss" in page and "edited" in page
    curve = next(i for i in imgs if i.size == (640, 300))
    assert np.asarray(curve.convert("L")).std() > 10, "the curve image is not blank"
    # a folder with nothing in it still gives a page, every section saying why
    empty = local_run / "empty"
    empty.mkdir()
    page = Path(write_report(str(empty))).read_text()
    assert page.count("not available") == 4
    # configuration given by the caller (the workflow runner passes the spec, which lives elsewhere)
    page = Path(write_report(str(empty), config={"workflow spec": {"name": "toy<1>"}})).read_text()
    assert page.count("not available") == 3 and "<h3>workflow spec</h3>" in page and "toy&lt;1&gt;" in page
    assert main(["report", str(local_run / "nope")]) == 1


def test_plot_curves_draws_every_series():
    img = plot_curves({"total": [3.0 - 0.01 * i for i in range(100)], "l1": [0.5] * 100}, list(range(100)), "t")
    arr = np.asarray(img)
    assert img.size == (640, 300)
    blue = ((arr[..., 2] > 150) & (arr[..., 0] < 80)).sum()
    orange = ((arr[..., 0] > 200) & (arr[..., 1] > 100) & (arr[..., 1] < 160) & (arr[..., 2] < 60)).sum()
    assert blue > 100 and orange > 100, (blue, orange)
    assert plot_curves({"x": [float("nan")]}).size == (640, 300)


def test_report_of_a_pipeline_run_folder(tmp_path):
    """A restyle output (shards, manifests, markers) + fine-tuned model cards + a workflow spec, as a run
    folder of `dclip-ray run` lays them out (models/, restyled/), built without a Ray cluster."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    data, _ = make_inputs(tmp_path, n=8, shard_size=4)
    base = tiny_unet_dir(tmp_path / "base", 0)
    models = run / "models"
    ft = tiny_unet_dir(models / "blue", 1, {"base_model": base, "config": {"t0": 200}})
    cfg = FinetuneConfig(source="red circle", target="blue circle", t0=200, epochs=2)
    history = [{"epoch": i // 10, "step": i, "t": 0, "total": 2.0 - 0.01 * i, "clip": 1.5 - 0.01 * i}
               for i in range(20)]
    save_finetuned(FinetuneResult(UNet2DModel.from_pretrained(ft), history, 1.0), ft, cfg,
                   UNet2DModel.from_pretrained(base), metrics={"quality_s_dir": 0.42}, extra={"base_model": base})
    (models / "broken").mkdir()
    (models / "broken" / "dclip.json").write_text("{not json")
    rcfg = build_restyle_config(str(run / "restyled"), models=[ft], n_inv_steps=3, n_gen_steps=2, batch_size=4)
    restyler = ShardRestyler(rcfg)
    for shard in ("00000", "bad"):
        restyler.run(shard, f"{data}/{shard}.tar")
    (run / "workflow.yaml").write_text("name: nightly\ninputs: data/\nprompts:\n  - red circle -> blue circle\n")
    (run / "runs.jsonl").write_text(json.dumps({"run": 1, "status": "ok"}) + "\n")

    path = write_report(str(run))
    page = Path(path).read_text()
    assert_self_contained(page)
    imgs = inline_images(page)
    grid = imgs[0]
    assert grid.height > 2 * CELL, "before and after rows"
    assert "committed shard(s)" in page and "4 error rows" in page, "manifest errors are listed"
    assert "quality_s_dir" in page and "0.42" in page
    assert "name: nightly" in page and "runs.jsonl" in page
    assert "not valid JSON" in page, "a broken model card is reported, not fatal"
    assert any(i.size == (640, 300) for i in imgs), "the loss curve of models/blue"


def _tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    """Read scalar summaries from TensorBoard event files (TFRecord framing) with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[float]] = {}
    for f in folder.rglob("events.out.tfevents.*"):
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(v.simple_value)
    return out


def test_finetune_logs_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboardX")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    clip = load_clip("toy_clip", weights=random_clip_weights(tmp_path))
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    cfg = FinetuneConfig(source="red circle", target="blue circle", t0=100, n_gen_steps=2, epochs=2, aug_views=0,
                         w_l1=1.0)
    res = finetune(unet, clip, x0, x0.clone(), linear_schedule(), cfg, tensorboard_dir=tmp_path / "tb")
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert len(scalars["loss/total"]) == len(res.history) == 2 * 2 * 2
    assert scalars["loss/total"] == pytest.approx([h["total"] for h in res.history], rel=1e-5)
    assert scalars["lr"][0] == pytest.approx(cfg.lr) and scalars["lr"][-1] == pytest.approx(cfg.lr * cfg.lr_gamma)


CHROMIUM = next((c for c in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")
                 if shutil.which(c)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(local_run, tmp_path):
    page = write_report(str(local_run), out=str(tmp_path / "r.html"))
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), page, str(shot),
                           "--width", "1000", "--height", "1400"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = Image.open(shot)
    assert img.size == (1000, 1400)
    arr = np.asarray(img.convert("RGB")).astype(float)
    assert arr.std() > 20, "the page rendered (not a blank screenshot)"
    colourful = ((arr.max(-1) - arr.min(-1)) > 80).sum()
    assert colourful > 500, "the inlined images were decoded and drawn (coloured pixels)"
