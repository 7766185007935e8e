"""`dclip-ray finetune`, `edit` and `latent-optim` end to end on the bundled toy models (tiny settings).

Edit quality is judged in tests/test_finetune_toyworld.py; here: the commands run, write what they
promise, report bad images instead of dropping them, and fail with exit code 1 on bad arguments.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image

from dclip_ray.cli import main
from dclip_ray.io.images import load_image_tensor
from dclip_ray.toyworld import sample_dataset


def test_finetune_edit_latent_optim_commands(tmp_path, capsys):
    torch.set_num_threads(1)
    images = tmp_path / "images"
    images.mkdir()
    for s in sample_dataset(3, seed=5, colours=["red"], shapes=["circle"]):
        Image.fromarray(s.image).save(images / f"{s.key}.png")
    (images / "broken.png").write_bytes(b"not a png")
    common = ["--model", "toy_shapes", "--images", str(images), "--json"]

    rc = main(["finetune", *common, "--source", "red circle", "--target", "blue circle", "--out", str(tmp_path / "ft"),
               "--n-train", "4", "--epochs", "1", "--n-inv", "5", "--n-gen", "2", "--lr", "1e-5", "--aug-views", "1",
               "--check-images", "0"])  # the command's mechanics, not edit quality: no check
    out = json.loads(capsys.readouterr().out)
    assert rc == 2, "a bad image finishes the job with per-item errors"
    assert out["n_train"] == 3 and [e["key"] for e in out["errors"]] == ["broken"]
    card = json.loads((tmp_path / "ft" / "dclip.json").read_text())
    assert card["target"] == "blue circle" and card["config"]["n_gen_steps"] == 2
    assert UNet2DModel.from_pretrained(tmp_path / "ft").config.sample_size == 32

    rc = main(["edit", "--model", "toy_shapes", "--finetuned", str(tmp_path / "ft"), "--images", str(images),
               "--out", str(tmp_path / "edited"), "--n-inv", "20", "--n-gen", "20", "--strength", "0.0", "--grid", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 2 and out["n_edited"] == 3 and out["t0"] == 500
    # Strength 0 is the original model alone: the edit is a DDIM reconstruction of the input.
    for s in sample_dataset(3, seed=5, colours=["red"], shapes=["circle"]):
        edited = load_image_tensor((tmp_path / "edited" / f"{s.key}.png").read_bytes(), 32)
        original = torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1
        mse = float(((edited - original) / 2).square().mean())
        assert 10 * np.log10(1 / mse) > 25
    assert (tmp_path / "edited" / "grid.png").exists()

    # A mix (eq. 14) whose gamma puts all weight on the original model reproduces the strength-0 edit
    # exactly; an edit needs exactly one of --finetuned / --mix.
    from dclip_ray.models import get_preset

    base_dir = get_preset("toy_shapes").weights_path()
    (tmp_path / "mix.yaml").write_text(f"models: [ft, {base_dir}]\ngamma: {{type: constant, weights: [0, 1]}}\n")
    rc = main(["edit", "--model", "toy_shapes", "--mix", str(tmp_path / "mix.yaml"), "--images", str(images),
               "--out", str(tmp_path / "mixed"), "--n-inv", "20", "--n-gen", "20", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 2 and out["mix"]["models"][0] == str(tmp_path / "ft")
    for s in sample_dataset(3, seed=5, colours=["red"], shapes=["circle"]):
        assert (tmp_path / "mixed" / f"{s.key}.png").read_bytes() == (tmp_path / "edited" / f"{s.key}.png").read_bytes()
    rc = main(["edit", "--model", "toy_shapes", "--mix", str(tmp_path / "mix.yaml"), "--finetuned", str(tmp_path / "ft"),
               "--images", str(images), "--out", str(tmp_path / "x")])
    assert rc == 1 and "exactly one of --finetuned" in capsys.readouterr().err

    rc = main(["latent-optim", *common, "--source", "red circle", "--target", "blue circle",
               "--out", str(tmp_path / "lo"), "--n-inv", "5", "--n-gen", "2", "--iterations", "2", "--limit", "2"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["n_edited"] == 2 and len(list((tmp_path / "lo").glob("*.png"))) == 2


def test_bad_arguments_exit_1_with_one_line(tmp_path, capsys):
    rc = main(["finetune", "--model", "toy_shapes", "--source", "a", "--target", "b", "--images", str(tmp_path),
               "--out", str(tmp_path / "ft"), "--mode", "fast"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "mode" in err[0]
    rc = main(["edit", "--model", "toy_shapes", "--finetuned", str(tmp_path), "--images", str(tmp_path / "none"),
               "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"error: --images {tmp_path / 'none'}: no such file or folder; check the path"]


def test_unknown_option_is_a_usage_error_not_a_traceback(capsys):
    # typer vendors its own click: its usage errors must map to exit 1 like click's own
    rc = main(["edit", "--bogus"])
    err = capsys.readouterr().err
    assert rc == 1 and "No such option: --bogus" in err and "Traceback" not in err
