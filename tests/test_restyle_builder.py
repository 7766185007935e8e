"""Issue 29 item 2: edit and restyle build their variants by one rule (the strength with a mix, the t0)."""

from __future__ import annotations

import yaml
from pipeline_fixtures import tiny_models, tiny_unet_dir

from dclip_ray.config import RestyleSettings
from dclip_ray.mixing import load_mix_spec
from dclip_ray.models.card import read_card
from dclip_ray.stages.edit import EditJob, _variant
from dclip_ray.stages.restyle_config import build_restyle_config


def test_strength_with_a_mix_means_the_same_in_edit_and_restyle(tmp_path):
    """``restyle --mix m.yaml --strength 0.5`` once ignored the strength that ``edit`` applied."""
    models = tiny_models(tmp_path / "m", 300)
    second = tiny_unet_dir(tmp_path / "m" / "ft2", 2, {"base_model": models["base"], "config": {"t0": 300}})
    mix = {"models": [models["ft"], second], "gamma": {"type": "constant", "weights": [0.25, 0.75]}}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(mix))
    restyled = build_restyle_config(str(tmp_path / "out"), mix=mix, strength=0.5).variants[0]
    job = EditJob(model=models["base"], finetuned=None, images="x", out=str(tmp_path / "e"), mix=str(path),
                  settings=RestyleSettings(strength=0.5))
    edited = _variant(job, load_mix_spec(str(path)), "state", [read_card(m) for m in mix["models"]], 300)
    assert (restyled.models, restyled.gamma, restyled.t0) == (edited.models, edited.gamma, edited.t0)
    assert restyled.models == [0, 1, 2] and restyled.gamma["weights"] == [0.5, 0.125, 0.375], restyled.gamma
    assert restyled.t0 == 300, "the t0 the models' cards agree on: the variant's own, the only one"
