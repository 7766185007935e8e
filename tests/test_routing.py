"""Restyle details of issue 19 found in review: captions, explicit routing without sources, partial latent
stores, and two runs of other models into one output root."""

from __future__ import annotations

import json

import pytest
from pipeline_fixtures import make_world

from dclip_ray.errors import ConfigError
from dclip_ray.io.latents import LatentKey
from dclip_ray.models.cache import cached_base
from dclip_ray.stages.inputs import input_shards
from dclip_ray.stages.precompute import precompute_shard
from dclip_ray.stages.provenance import edited_caption, output_members
from dclip_ray.stages.restyle_config import build_restyle_config, write_declaration
from dclip_ray.stages.training_data import training_data

T0, N_INV = 200, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), T0)


def test_a_caption_changes_only_where_it_names_the_source():
    edit = [["red circle", "blue circle"]]
    assert edited_caption("a Red Circle on grey", edit) == "a blue circle on grey"
    assert edited_caption("a green square", edit) == "a green square", "not this edit's image: kept"
    assert edited_caption("a covered circle", edit) == "a covered circle", "whole words only"
    assert edited_caption(None, edit) is None
    members = output_members({"txt": b"a red circle", "json": json.dumps({"caption": "a red circle", "k": 1}).encode()},
                             {"variant": "blue"}, edit)
    meta = json.loads(members["json"])
    assert (meta["caption"], meta["original_caption"], meta["k"], members["txt"]) == (
        "a blue circle", "a red circle", 1, b"a blue circle")
    assert "txt" not in output_members({}, {"variant": "blue"}, edit), "no caption is invented"


def test_explicit_routing_needs_a_source_for_every_model(world, tmp_path):
    with pytest.raises(ConfigError, match="--route source: ft1 has no source"):
        build_restyle_config(str(tmp_path / "o"), models=world["fts"][:1], route="source", n_inv_steps=N_INV)
    cfg = build_restyle_config(str(tmp_path / "o"), models=world["fts"][:2], n_inv_steps=N_INV)
    assert cfg.route == "all" and [v.out for v in cfg.variants] == [str(tmp_path / "o" / n) for n in ("ft1", "ft2")]


def test_a_partial_latent_store_is_an_error_not_a_smaller_training_set(world, tmp_path):
    base = cached_base(world["base"])
    lat = str(tmp_path / "lat")
    shards = dict(input_shards(world["data"]))
    precompute_shard(world["base"], None, "bad", shards["bad"], lat, LatentKey(base.sha256, T0, N_INV, 32))
    keys, *_ = training_data(base, 5, T0, N_INV, latents_root=lat, keys=["ok1", "ok2"])
    assert keys == ["ok1", "ok2"]
    with pytest.raises(ConfigError, match="holds current latents at t0=200 for 2 of the 3 images chosen"):
        training_data(base, 5, T0, N_INV, latents_root=lat, keys=["ok1", "ok2", world["keys"]["00000"][0]])


def test_two_runs_of_other_models_into_one_root_are_both_declared(world, tmp_path):
    out = str(tmp_path / "o")
    for m in world["fts"][:2]:
        write_declaration(build_restyle_config(out, models=[m], n_inv_steps=N_INV), world["data"])
    declared = json.loads((tmp_path / "o" / "restyle.json").read_text())["variants"]
    assert [v["folder"] for v in declared] == ["ft1", "ft2"]


def test_a_routing_clip_that_is_not_there_fails_before_any_work(world, tmp_path):
    from pipeline_fixtures import tiny_unet_dir

    from dclip_ray.errors import InputFileError
    from dclip_ray.stages.restyle_config import check_restyle

    card = {"base_model": world["base"], "config": {"t0": T0}, "clip": "toy_clip", "clip_weights": "/nonexistent.pt"}
    models = [tiny_unet_dir(tmp_path / name, i, {**card, "source": src, "target": "blue circle"})
              for i, (name, src) in enumerate((("a", "red circle"), ("b", "green square")), start=1)]
    cfg = build_restyle_config(str(tmp_path / "o"), models=models, n_inv_steps=N_INV)
    assert cfg.route == "source" and cfg.clip == "toy_clip"
    with pytest.raises(InputFileError, match="the CLIP that routes uncaptioned images .*--clip toy_clip.*no such file"):
        check_restyle(cfg, world["data"])
    ok = build_restyle_config(str(tmp_path / "o"), models=models, n_inv_steps=N_INV, clip="toy_clip",
                              clip_weights=None)
    assert ok.clip_weights == "/nonexistent.pt", "the card's weights unless --clip-weights is given"
    fixed = build_restyle_config(str(tmp_path / "o"), models=models, n_inv_steps=N_INV, route="all")
    check_restyle(fixed, world["data"])  # not routed: the CLIP is never loaded, so it is not checked
