"""Metrics of `dclip-ray eval`: PSNR/SSIM against their formulas, S_dir and the CLIP score under the toy CLIP,
the toy judge's success rate, FID/KID plumbing, and the command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dclip_ray.cli import main
from dclip_ray.evaluation import (
    clip_score,
    directional_similarity,
    fid_kid,
    judge_success,
    psnr,
    ssim,
    summarize,
)
from dclip_ray.models import load_clip
from dclip_ray.toyworld import render, sample_dataset
from dclip_ray.toyworld.render import sample_params


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def pair(n: int = 16, seed: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Red circles and the same circles in blue (a perfect red -> blue edit)."""
    params = [sample_params(np.random.default_rng([seed, i])) for i in range(n)]
    red = to_tensor([render("red", "circle", params=p)[0] for p in params])
    blue = to_tensor([render("blue", "circle", params=p)[0] for p in params])
    return red, blue


@pytest.fixture(scope="module")
def clip():
    torch.set_num_threads(1)
    return load_clip("toy_clip")


def test_psnr_matches_the_formula_and_ssim_orders_noise_levels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    for sigma in (0.02, 0.1):
        noisy = x + sigma * torch.randn(x.shape, generator=g)
        expected = 10 * math.log10(2.0**2 / sigma**2)  # range 2 for [-1, 1]
        assert psnr(noisy, x).sub(expected).abs().max() < 0.15, (psnr(noisy, x), expected)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    s_small = ssim(x + 0.02 * torch.randn(x.shape, generator=g), x)
    s_big = ssim(x + 0.2 * torch.randn(x.shape, generator=g), x)
    assert (s_small > 0.9).all() and (s_big < s_small - 0.2).all(), (s_small, s_big)
    s = summarize([float("inf"), 1.0, 3.0])
    assert s["n"] == 2 and s["n_inf"] == 1 and s["mean"] == 2.0


def test_directional_similarity_and_clip_score_under_the_toy_clip(clip):
    red, blue = pair()
    other = to_tensor([s.image for s in sample_dataset(16, 77)])
    s_true = directional_similarity(clip, red, blue, "red circle", "blue circle")
    s_random = directional_similarity(clip, red, other, "red circle", "blue circle")
    s_reverse = directional_similarity(clip, blue, red, "red circle", "blue circle")
    assert s_true.mean() > 0.8 and s_true.min() > 0.6, s_true  # seen mean 0.90, min 0.84
    assert s_true.mean() > s_random.mean() + 0.3, (s_true.mean(), s_random.mean())  # random pairs: 0.37
    assert s_reverse.mean() < -0.8, "blue -> red points against the red -> blue text direction"
    assert directional_similarity(clip, red, red, "red circle", "blue circle").abs().max() < 1e-6
    assert clip_score(clip, blue, "blue circle").mean() > clip_score(clip, red, "blue circle").mean() + 0.5


def test_judge_success_rate_on_known_renders():
    red, blue = pair(12)
    assert judge_success(blue, "blue", "circle") == [True] * 12
    assert judge_success(blue, "blue") == [True] * 12
    assert not any(judge_success(red, "blue"))
    assert not any(judge_success(blue, "blue", "square"))
    mixed = torch.cat([blue[:3], red[:1]])
    assert judge_success(mixed, ["blue", "blue", "red", "red"]) == [True, True, False, True]
    muddy = blue[:4] * 0.6  # a muddier blue, ~60 RGB units from the palette's: what colour edits produce
    assert all(judge_success(muddy, "blue", "circle")), "the one judge: toyworld judge calls these blue circles"
    grey = blue[:4] * 0.2  # > 100 RGB units from every palette colour: 'other'
    assert not any(judge_success(grey, "blue", "circle"))


def test_eval_command_writes_parquet_and_summary(tmp_path, capsys):
    red, blue = pair(6)
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    for i in range(6):
        Image.fromarray(((red[i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(before / f"k{i}.png")
        if i < 5:
            Image.fromarray(((blue[i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(after / f"k{i}.png")
    (after / "extra.png").write_bytes(b"broken")
    out = tmp_path / "m" / "eval.parquet"
    rc = main(["eval", "--before", str(before), "--after", str(after), "--source", "red circle", "--target",
               "blue circle", "--clip", "toy_clip", "--judge-colour", "blue", "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 2, "an unreadable edited image is a per-item error"
    assert res["n_images"] == 5 and [e["key"] for e in res["errors"]] == ["extra"]
    s = res["summary"]
    assert s["judge_success"]["mean"] == 1.0 and s["judge_success_before"]["mean"] == 0.0
    assert s["s_dir"]["mean"] > 0.8 and s["ssim"]["mean"] < 1.0 and s["psnr"]["mean"] < 20
    table = pq.read_table(out).to_pylist()
    assert [r["key"] for r in table] == [f"k{i}" for i in range(5)] and table[0]["judge_success"] == 1.0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["summary"]["s_dir"]["n"] == 5 and side["per_image_file"] == "eval.parquet"

    rc = main(["eval", "--before", str(before), "--after", str(before)])
    assert rc == 0 and "psnr" in capsys.readouterr().out, "a table is printed; identical sets are fine (inf PSNR)"


def test_eval_bad_arguments_exit_1_with_one_line(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(render("red", "circle", seed=0)[0]).save(folder / "a.png")
    cases = [
        (["--inception-weights", str(tmp_path / "missing.pth")], "missing.pth"),
        (["--source", "red circle"], "--target"),
        (["--source", "a", "--target", "b"], "--clip"),
    ]
    for extra, needle in cases:
        capsys.readouterr()
        rc = main(["eval", "--before", str(folder), "--after", str(folder), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and needle in err[0], err
    not_weights = tmp_path / "w.pth"
    torch.save({"some.weight": torch.zeros(2)}, not_weights)
    rc = main(["eval", "--before", str(folder), "--after", str(folder), "--inception-weights", str(not_weights)])
    assert rc == 1 and "Conv2d_1a_3x3" in capsys.readouterr().err


def random_inception_weights(path) -> str:
    """torch-fidelity's FID InceptionV3 with random (Kaiming) weights, saved like the real file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    for p in net.parameters():
        if p.ndim in (2, 4):
            torch.nn.init.kaiming_normal_(p)
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_fid_kid_plumbing_on_random_inception_weights(tmp_path):
    """Random weights prove the plumbing only (a real FID needs the real weights and thousands of images)."""
    pytest.importorskip("torch_fidelity")
    weights = random_inception_weights(tmp_path / "inception.pth")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    b = torch.rand(3, 3, 32, 32, generator=g) * 0.2
    same = fid_kid(a, a.clone(), weights, kid_subset_size=2)
    different = fid_kid(a, b, weights, kid_subset_size=2)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 1e-2, same
    assert different["fid"] > 10 and different["kid_mean"] > 0.05, different  # seen 267 and 0.56
