"""Issue 29 item 3: the model card is typed (dclip_ray/models/card.py), written by save_finetuned and copy_model
through one writer, and read once per model by a restyle before Ray starts."""

from __future__ import annotations

import json

import fsspec
import pytest
from pipeline_fixtures import make_inputs, tiny_models, tiny_unet_dir

from dclip_ray.errors import InputFileError
from dclip_ray.models import card as card_module
from dclip_ray.models.card import ModelCard, read_card, write_card


def test_a_card_reads_the_same_from_a_folder_a_file_url_and_an_object_store(tmp_path):
    data = {"source": "red circle", "target": "blue circle", "config": {"t0": 400}, "base_model": "toy_shapes",
            "clip_weights": "None", "final_loss": float("nan"), "format": "dclip-ray/finetuned-unet/1"}
    write_card(str(tmp_path / "m"), data)
    write_card("memory://cards/m", data)
    assert json.loads((tmp_path / "m" / "dclip.json").read_text())["final_loss"] is None, "strict JSON"
    assert not fsspec.filesystem("memory").exists("/cards/m/dclip.json.tmp")
    for where in (str(tmp_path / "m"), f"file://{tmp_path}/m", "memory://cards/m"):
        c = read_card(where)
        assert (c.source, c.target, c.t0, c.edits, c.clip_weights, c.is_adapter) == (
            "red circle", "blue circle", 400, [["red circle", "blue circle"]], None, False), where
    empty = read_card(str(tmp_path))  # a folder without a card (a plain diffusers folder)
    assert not empty.exists and empty.edits == [] and empty.t0 is None and read_card("memory://none").data == {}


@pytest.mark.parametrize("text, what", [("{not json", "not valid JSON"), ("[1]", "expected a JSON object"),
                                        ('{"config": {"t0": 5000}}', "config.t0 should be a step in 1..999"),
                                        ('{"source": 3}', "field 'source' should be str")])
def test_a_damaged_card_is_one_line_naming_the_file(tmp_path, text, what):
    (tmp_path / "dclip.json").write_text(text)
    with pytest.raises(InputFileError, match=what) as e:
        read_card(str(tmp_path))
    assert str(tmp_path / "dclip.json") in str(e.value) and "\n" not in str(e.value)


def test_a_card_that_is_there_but_cannot_be_read_is_an_error_never_no_card(tmp_path, monkeypatch):
    """A failing read (permissions, an object store's error) once read as "no card" for URLs: edits then went
    unscored and the base unnamed without saying why. Only a missing card is an empty one."""
    real_open = fsspec.open

    def failing(url, *args, **kwargs):
        if url.endswith("dclip.json"):
            raise PermissionError(13, "Access Denied")
        return real_open(url, *args, **kwargs)

    monkeypatch.setattr(fsspec, "open", failing)
    for where in (str(tmp_path), "memory://cards/m", "s3://bucket/m"):
        with pytest.raises(InputFileError, match="cannot be read .*Access Denied"):
            read_card(where)


def test_a_restyle_reads_each_models_card_once_before_its_workers_start(tmp_path, monkeypatch):
    """Before: each model's card was read 6 times by the driver (base, edits, t0, CLIP, base check, sha256)
    and again in every worker; now once, and the workers get the cards with the config."""
    from dclip_ray.stages.restyle import ShardRestyler, model_shas
    from dclip_ray.stages.restyle_config import build_restyle_config, check_restyle

    models = tiny_models(tmp_path / "m", 200)
    second = tiny_unet_dir(tmp_path / "m" / "ft2", 2, {"base_model": models["base"], "config": {"t0": 200},
                                                        "source": "red circle", "target": "blue circle"})
    data, _ = make_inputs(tmp_path, n=4, shard_size=4)
    reads = []
    parse = ModelCard.from_data.__func__

    def counted(cls, value, where):
        reads.append(where)
        return parse(cls, value, where)

    monkeypatch.setattr(card_module.ModelCard, "from_data", classmethod(counted))
    cfg = build_restyle_config(str(tmp_path / "out"), models=[models["ft"], second], n_inv_steps=2, n_gen_steps=2)
    check_restyle(cfg, data)
    model_shas(cfg)
    ShardRestyler(cfg)
    assert sorted(reads) == sorted(f"{m}/dclip.json" for m in (models["ft"], second)), reads
    assert [c.edits for c in cfg.model_cards()] == [[], [["red circle", "blue circle"]]]
