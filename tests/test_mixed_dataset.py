"""The main job on a mixed dataset (issue 19), end to end through the CLI on Ray, judged from pixels:

a dataset of 4 shards mixing three kinds of toy image and a prompt file of three edits (two colour
edits and one shape edit, each line with the recipe the docs give, the shape edit at another t0):
precompute -> finetune-many -> restyle -> verify. Each prompt must train on images of its own source
(the training keys recorded in each model card are judged by the dataset's labels), each model must
edit only the images of its source (the others are 'skipped' manifest rows), both t0 must restyle in
one pass with one inversion per image and t0, every key must be exactly once per output, and each
model must edit its own images the way the recipe does on one machine.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from dclip_ray.cli import main
from dclip_ray.io.manifest import read_manifest
from dclip_ray.toyworld import judge
from dclip_ray.toyworld.data import write_shards

pytestmark = pytest.mark.slow

KINDS = [("red", "circle"), ("green", "square"), ("blue", "circle")]
COLOUR = "t0=500 n_gen=6 epochs=5 lr=5e-5 l1=0.5 edge=8 views=8 shift=4 noise=0.2 refine=2 refine_l1=1.5 refine_scales=3"
SHAPE = "t0=550 mode=full n_gen=10 epochs=5 lr=1e-4 clip_weight=5 l1=2 views=8 shift=4 noise=0.1 flip=hv"
PROMPTS = f"""red circle -> blue circle name=blue {COLOUR}
green square -> yellow square name=yellow {COLOUR}
blue circle -> blue square name=square {SHAPE}
"""
N, SHARD = 96, 24


def run_json(capsys, argv):
    capsys.readouterr()
    rc = main(argv + ["--json"])
    return rc, json.loads(capsys.readouterr().out)


def read_samples(tar_path):
    """{key: {ext: bytes}} of a WebDataset tar."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def test_each_prompt_trains_on_its_source_and_each_model_edits_only_its_images(ray_local, tmp_path, capsys):
    data, lat, models, out = (str(tmp_path / d) for d in ("data", "lat", "models", "out"))
    write_shards(data, N, seed=5, shard_size=SHARD, kinds=KINDS)
    inputs = {}
    for name in sorted(os.listdir(data)):
        inputs.update(read_samples(os.path.join(data, name)))
    label = {k: tuple(json.loads(v["json"])[f] for f in ("colour", "shape")) for k, v in inputs.items()}
    for t0 in (500, 550):
        assert main(["precompute", "--model", "toy_shapes", "--input", data, "--t0", str(t0), "--out", lat]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    rc, s = run_json(capsys, ["finetune-many", str(prompts), "--model", "toy_shapes", "--latents", lat, "--images",
                              data, "--out", models, "--max-concurrent", "2"])
    assert rc == 0, s
    source = {"blue": ("red", "circle"), "yellow": ("green", "square"), "square": ("blue", "circle")}
    for row in s["prompts"]:
        card = json.loads(open(os.path.join(row["model_path"], "dclip.json")).read())
        assert len(card["train_keys"]) == 16 and {label[k] for k in card["train_keys"]} == {source[row["name"]]}
        assert row["training_set"]["matched"] == 16 and row["training_set"]["by"] == {"caption": 16}

    argv = ["restyle", "--input", data, "--out", out, "--latents", lat, "--n-inv", "40", "--n-gen", "20"]
    for name in ("blue", "yellow", "square"):
        argv += ["--model", os.path.join(models, name)]
    rc, plan = run_json(capsys, argv + ["--dry-run"])
    assert rc == 0 and plan["t0s"] == [500, 550] and plan["route"] == "source"
    rc, r = run_json(capsys, argv)
    assert rc == 0 and r["route"] == "source" and r["n_errors"] == 0
    assert r["inv_evals"] == 0, "both t0 came from the latent store: no image inverted again"
    assert r["n_routed"] == 2 * N, "each image is edited by the one model of its source"
    assert main(["verify", out, "--input", data]) == 0

    results = {}
    for name in ("blue", "yellow", "square"):
        folder = os.path.join(out, name)
        rows = [row for shard in sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
                for row in read_manifest(os.path.join(folder, shard))]
        assert sorted(row.key for row in rows) == sorted(inputs), "every key exactly once per output"
        ok = {row.key for row in rows if row.status == "ok"}
        assert ok == {k for k in inputs if label[k] == source[name]}, "only the images of its source"
        assert all("routed away" in row.error for row in rows if row.status == "skipped")
        edited = {}
        for shard in sorted(f for f in os.listdir(folder) if f.endswith(".tar")):
            edited.update(read_samples(os.path.join(folder, shard)))
        verdicts = []
        for k in sorted(ok):
            meta = json.loads(edited[k]["json"])
            assert meta["dclip"]["edits"][0]["source"] == " ".join(source[name])
            assert meta["original_caption"] == f"a {' '.join(source[name])}" != meta["caption"]
            assert edited[k]["txt"].decode() == meta["caption"]
            assert meta["dclip"]["t0"] == (550 if name == "square" else 500)
            mask = np.array(Image.open(io.BytesIO(inputs[k]["mask.png"]))) > 127
            verdicts.append(judge(np.array(Image.open(io.BytesIO(edited[k]["png"])).convert("RGB")), ref_mask=mask))
        results[name] = verdicts
    for name, target in (("blue", ("blue", "circle")), ("yellow", ("yellow", "square"))):
        v = results[name]
        success = np.mean([(x.colour, x.shape) == target for x in v])
        iou = np.mean([x.iou for x in v])
        bg = np.mean([x.bg_error for x in v]) * 255
        print(f"\n{name}: {success:.0%} {target}, IoU {iou:.3f}, background {bg:.1f}/255 over {len(v)}")
        assert success >= 0.85 and iou >= 0.75 and bg <= 10, (name, success, iou, bg)
    v = results["square"]
    success = np.mean([(x.colour, x.shape) == ("blue", "square") for x in v])
    print(f"square: {success:.0%} blue squares over {len(v)}")
    assert success >= 0.6, success
