"""Recipes as data (issue 20 item 1): named fine-tuning settings in one table (dclip_ray/recipes.yaml),
reached from `finetune --recipe`, a prompt line's `recipe=`, a workflow spec's `finetune.recipe`, the
edit presets (each names one) and the model presets (the recipe of an edit that names none). A value
given on a line, the command line or the spec beats the recipe's; the recipe used is recorded."""

from __future__ import annotations

import json

import pytest
import typer

from dclip_ray.cli import app, main
from dclip_ray.cli.settings import collect
from dclip_ray.config import FinetuneConfig, recipe_settings, resolve_finetune_config
from dclip_ray.errors import ConfigError
from dclip_ray.models import get_preset
from dclip_ray.prompts import get_edit_preset, list_edit_presets, parse_prompt_text
from dclip_ray.recipes import get_recipe, list_recipes, recipe_names
from dclip_ray.stages.finetune_many import FinetuneManyJob, finetune_config
from dclip_ray.workflow import parse_spec

TOY = get_preset("toy_shapes")


def fields_of(name: str) -> dict:
    return recipe_settings(name)


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_is_valid_and_says_what_it_is_for(name):
    r = get_recipe(name)
    assert r.help and r.tuned_on and r.settings
    cfg = resolve_finetune_config("a", "b", {"recipe": name})
    for field, value in fields_of(name).items():
        assert getattr(cfg, field) == value, (name, field)
    assert cfg.recipe == name


def test_the_order_line_job_recipe_edit_preset_model_preset_default():
    shape, colour = fields_of("shape"), fields_of("colour")
    c = resolve_finetune_config("a", "b", preset=TOY)  # an edit naming nothing: the model preset's recipe
    assert c.recipe == TOY.recipe == "colour" and c.lr == colour["lr"] and c.w_edge == colour["w_edge"]
    c = resolve_finetune_config("a", "b", None, {"recipe": "shape"}, preset=TOY)  # the job's recipe
    assert (c.recipe, c.mode, c.t0, c.w_clip) == ("shape", "full", shape["t0"], shape["w_clip"])
    c = resolve_finetune_config("a", "b", {"lr": 3e-5}, {"recipe": "shape", "t0": 420}, preset=TOY)
    assert (c.lr, c.t0, c.mode) == (3e-5, 420, "full"), "the line's and the job's values beat the recipe"
    c = resolve_finetune_config("a", "b", {"recipe": "colour"}, {"recipe": "shape"}, preset=TOY)
    assert c.recipe == "colour", "the line's recipe beats the job's"
    sq = get_edit_preset("toy_circle_to_square")
    c = resolve_finetune_config("a", "b", preset=TOY, edit_preset=sq)  # a bare preset line: its recipe
    assert (c.recipe, c.mode, c.t0) == ("shape", "full", sq.t0)
    neander = get_edit_preset("neanderthal")  # the preset's t0 (601) beats its own recipe's (none) and the base's
    c = resolve_finetune_config("a", "b", preset=get_preset("celeba_hq"), edit_preset=neander)
    assert (c.recipe, c.t0, c.lr, c.w_l1, c.aug_views) == ("paper", 601, 8e-6, 1.0, 0)
    c = resolve_finetune_config("a", "b", {"recipe": "colour"}, preset=TOY, edit_preset=sq)
    assert (c.recipe, c.t0, c.mode) == ("colour", 500, "efficient"), "a recipe you name beats the preset's t0"
    c = resolve_finetune_config("a", "b")  # no preset at all: the declared defaults, no recipe
    assert c.recipe is None and c.lr == FinetuneConfig("a", "b").lr


def test_every_edit_preset_trains_with_its_recipe():
    for p in list_edit_presets():
        base = get_preset(p.model) if p.model else None
        c = resolve_finetune_config(p.source, p.target, preset=base, edit_preset=p)
        assert c.recipe == p.recipe and c.t0 == p.t0, p.name
        for field, value in fields_of(p.recipe).items():
            assert field == "t0" or getattr(c, field) == value, (p.name, field)


def test_prompt_lines_bare_presets_and_the_job_reach_the_config():
    text = ("toy_circle_to_square\n"
            "toy_red_to_blue name=blue2 lr=2e-5\n"
            "red circle -> green circle recipe=shape name=g\n"
            "red circle -> red triangle name=tri\n")
    sq, blue, g, tri = parse_prompt_text(text)
    job = FinetuneManyJob(prompts="p.txt", model="toy_shapes", out="o", settings={"recipe": "shape"})
    plain = FinetuneManyJob(prompts="p.txt", model="toy_shapes", out="o")
    assert (finetune_config(sq, plain, TOY).recipe, finetune_config(sq, plain, TOY).mode) == ("shape", "full")
    c = finetune_config(blue, plain, TOY)
    assert (c.recipe, c.lr, c.w_edge) == ("colour", 2e-5, fields_of("colour")["w_edge"])
    assert finetune_config(g, plain, TOY).recipe == "shape"
    assert finetune_config(tri, plain, TOY).recipe == "shape-upright", "a line naming nothing: the model preset's"
    assert finetune_config(tri, job, TOY).recipe == "shape", "the job's recipe (CLI or spec)"
    assert finetune_config(blue, job, TOY).recipe == "shape", "the job's recipe beats the preset's"


def test_finetune_cli_and_spec_take_a_recipe(tmp_path):
    cmd = typer.main.get_command(app).commands["finetune"]
    argv = ["--model", "m", "--source", "a", "--target", "b", "--images", "i", "--out", "o", "--recipe", "shape",
            "--lr", "2e-5"]
    given = collect(cmd.make_context("finetune", argv).params, FinetuneConfig, "settings")
    c = resolve_finetune_config("a", "b", given, preset=TOY)
    assert (c.recipe, c.mode, c.lr) == ("shape", "full", 2e-5)
    spec = parse_spec({"name": "t", "input": {"toyworld": {"n": 4}}, "model": "toy_shapes",
                       "prompts": ["red circle -> red square name=sq"], "outputs": {"root": str(tmp_path)},
                       "finetune": {"recipe": "shape"}})
    assert spec.finetune.settings()["recipe"] == "shape"


def test_a_bad_recipe_is_one_line_naming_the_choices(capsys, tmp_path):
    with pytest.raises(ConfigError, match="2:34: bad value 'colur' for recipe; expected one of paper, colour"):
        parse_prompt_text("a -> b\nred circle -> blue circle recipe=colur")
    rc = main(["finetune", "--model", "toy_shapes", "--source", "a", "--target", "b", "--images", str(tmp_path),
               "--out", str(tmp_path / "o"), "--recipe", "colur"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "--recipe 'colur': expected one of paper, colour, shape" in err
    with pytest.raises(ConfigError, match="recipe"):
        parse_spec({"name": "t", "input": {"toyworld": {"n": 4}}, "model": "toy_shapes", "prompts": ["a -> b"],
                    "outputs": {"root": str(tmp_path)}, "finetune": {"recipe": "colur"}})


def test_recipes_and_presets_show_print_the_resolved_settings(capsys):
    assert main(["recipes", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [r.name for r in list_recipes()]
    assert main(["recipes", "show", "shape"]) == 0
    assert "flip=hv" in capsys.readouterr().out
    assert main(["presets", "show", "toy_circle_to_square", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["recipe"] == "shape" and d["settings"]["mode"] == "full" and d["settings"]["t0"] == 550
    assert d["settings"]["flip"] == "hv" and d["settings"]["views"] == 8
    assert main(["recipes", "show", "nope"]) == 1
    assert "unknown recipe 'nope'; use one of paper, colour, shape" in capsys.readouterr().err


@pytest.mark.parametrize("source, target, recipe", [
    ("red circle", "blue circle", "colour"), ("green square", "yellow square", "colour"),
    ("blue circle", "blue square", "shape"), ("red square", "red circle", "shape"),
    ("red circle", "red triangle", "shape-upright"), ("yellow triangle", "yellow square", "shape-upright"),
    ("red circle", "blue square", "shape"),
])
def test_the_toy_model_gives_a_shape_change_the_shape_recipe(source, target, recipe):
    """An edit naming no recipe: the toy model preset's recipe_when_changed picks it from the changed words,
    so a line with the old explicit shape settings and no recipe is not mixed with the colour recipe."""
    assert resolve_finetune_config(source, target, preset=TOY).recipe == recipe
    old_style = {"t0": 550, "mode": "full", "n_gen_steps": 10, "lr": 1e-4, "w_clip": 5, "w_l1": 2, "aug_views": 8,
                 "aug_shift": 4, "aug_noise": 0.1, "aug_flip": "hv"}
    c = resolve_finetune_config("blue circle", "blue square", old_style, preset=TOY)
    assert (c.w_edge, c.refine_from, c.aug_flip) == (0.0, 0, "hv"), "no colour-recipe edge loss in a shape edit"


def test_a_recipe_that_names_lora_takes_its_lora_values_unless_the_run_says_full(monkeypatch):
    import dclip_ray.recipes as recipes

    table = {**recipes._load(), "shape": recipes.Recipe("shape", "", "", {"adapter": "lora", "lr": 5e-5}, {"lr": 5e-4})}
    monkeypatch.setattr(recipes, "_load", lambda: table)
    c = resolve_finetune_config("a", "b", {"recipe": "shape"})
    assert (c.adapter, c.lr) == ("lora", 5e-4), "the recipe's own adapter brings its lora values"
    c = resolve_finetune_config("a", "b", {"recipe": "shape", "adapter": "full"})
    assert (c.adapter, c.lr) == ("full", 5e-5), "adapter=full on the line: the full model's values"


def test_a_lora_run_takes_the_recipes_lora_values():
    c = resolve_finetune_config("a", "b", {"adapter": "lora"}, preset=TOY)  # the model preset's recipe
    assert (c.recipe, c.adapter, c.lr) == ("colour", "lora", float(get_recipe("colour").lora["lr"]))
    assert resolve_finetune_config("a", "b", {"adapter": "lora", "lr": 1e-4}, preset=TOY).lr == 1e-4, "given beats it"
    assert resolve_finetune_config("a", "b", preset=TOY).lr == fields_of("colour")["lr"], "full fine-tuning: unchanged"
    sq = resolve_finetune_config("a", "b", {"recipe": "shape"}, {"adapter": "lora"})
    assert sq.lr == float(get_recipe("shape").lora["lr"]) and sq.mode == "full"
