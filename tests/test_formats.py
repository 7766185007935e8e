"""Issue 29 item 5: one table of output image formats (dclip_ray/io/formats.py); webp was added as one line of it."""

from __future__ import annotations

import tarfile

import pytest
import torch
from pipeline_fixtures import make_inputs, tiny_models

from dclip_ray.errors import ConfigError
from dclip_ray.io.formats import OUTPUT_FORMATS, output_format
from dclip_ray.io.images import encode_image, load_image_tensor
from dclip_ray.stages.inputs import input_shards
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import build_restyle_config
from dclip_ray.stages.verify import verify
from dclip_ray.toyworld import render


@pytest.mark.parametrize("name", sorted(OUTPUT_FORMATS))
def test_every_output_format_round_trips(name):
    x = torch.from_numpy(render("red", "circle", seed=3)[0]).permute(2, 0, 1).float() / 127.5 - 1
    back = load_image_tensor(encode_image(x, name), 32)
    if OUTPUT_FORMATS[name].lossless:
        assert (back - x).abs().max().item() <= 1 / 127.5, name
    else:
        assert (back - x).abs().mean().item() < 0.05, name


def test_an_unknown_format_names_the_choices():
    with pytest.raises(ConfigError, match="expected one of png, jpg, webp"):
        output_format("gif")
    assert output_format("jpeg").ext == "jpg"


def test_a_restyle_in_webp_writes_webp_members_and_verifies(tmp_path):
    models = tiny_models(tmp_path / "m", 200)
    data, keys = make_inputs(tmp_path, n=8, shard_size=8)
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=[models["ft"]], n_inv_steps=2, n_gen_steps=2, batch_size=4,
                               image_format="webp")
    for name, path in input_shards(data):
        ShardRestyler(cfg).run(name, path)
    with tarfile.open(f"{out}/ft/00000.tar") as t:
        exts = {n.split(".", 1)[1] for n in t.getnames()}
    assert "webp" in exts and "png" not in exts, exts
    report = verify(out, data)
    assert report.ok, report.problems
