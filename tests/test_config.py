"""Each fine-tuning setting is declared once (dclip_ray.config.FinetuneConfig) and reaches every surface:
the `finetune` and `finetune-many` options, the prompt line (per-prompt settings) and the workflow spec,
with the same default and the same rule (issue 18 item 1). The t0 rule lives in one function."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from dclip_ray.cli import app
from dclip_ray.cli.settings import collect
from dclip_ray.config import FinetuneConfig, SettingInfo, resolve_finetune_config, settings_of
from dclip_ray.errors import ConfigError
from dclip_ray.models import get_preset
from dclip_ray.pipeline.finetune_many import FinetuneManyJob, finetune_config
from dclip_ray.prompts import parse_prompt_text
from dclip_ray.workflow.spec import FinetuneSpec, LatentsSpec

SETTINGS = settings_of(FinetuneConfig)
IDS = [s.name for s in SETTINGS]
COMMANDS = {"finetune": ["--model", "m", "--source", "a", "--target", "b", "--images", "i", "--out", "o"],
            "finetune-many": ["p.txt", "--model", "m", "--out", "o"]}


def good_value(s: SettingInfo):
    """A valid value that is not the default."""
    if s.choices is not None:
        return next(c for c in s.choices if c and c != s.default and c != "none")
    if s.type is bool:
        return True
    if s.type is int:
        v = int(s.lo or 0) + 2
        return v if v != s.default else v + 1
    return (s.default or 0.0) * 2 + 0.5


def bad_value(s: SettingInfo):
    """A value the setting's rule refuses (None for a setting whose every value of its type is valid)."""
    if s.choices is not None:
        return "bogus"
    if s.type is bool:
        return None
    if s.hi is not None:
        return s.hi + 1
    if s.lo is not None:
        return s.lo if s.lo_strict else s.lo - 1
    return None


def cli_settings(command: str, extra: list[str]) -> dict:
    click_cmd = typer.main.get_command(app).commands[command]
    ctx = click_cmd.make_context(command, COMMANDS[command] + extra)
    return collect(ctx.params)


def as_text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def test_every_setting_has_a_cli_name_and_one_declaration():
    assert [f.name for f in dataclasses.fields(FinetuneConfig)] == ["source", "target"] + IDS, \
        "every field but the prompt pair is a declared setting"
    assert len({s.cli for s in SETTINGS}) == len(SETTINGS)
    assert len({s.prompt for s in SETTINGS if s.prompt}) == len([s for s in SETTINGS if s.prompt])
    per_prompt = {s.name for s in SETTINGS if s.prompt}
    assert {"aug_views", "aug_blur", "w_global", "clip_form", "w_id", "t0", "lr"} <= per_prompt


@pytest.mark.parametrize("s", SETTINGS, ids=IDS)
def test_a_setting_given_nowhere_takes_the_declared_default_on_every_surface(s):
    assert getattr(resolve_finetune_config("a", "b"), s.name) == s.default
    for command in COMMANDS:
        assert s.name not in cli_settings(command, []), "an option not given is not a setting given"
    line = parse_prompt_text("a -> b")[0]
    assert getattr(finetune_config(line, FinetuneManyJob(prompts="p", model="m", out="o"), None), s.name) == s.default
    assert s.name not in FinetuneSpec().settings()


@pytest.mark.parametrize("s", SETTINGS, ids=IDS)
def test_a_setting_reaches_the_config_from_every_surface(s):
    v = good_value(s)
    job = FinetuneManyJob(prompts="p", model="m", out="o", face_weights="f.pt")
    for command in COMMANDS:
        flag = [s.option] if s.type is bool else [s.option, as_text(v)]
        got = cli_settings(command, flag)
        assert getattr(resolve_finetune_config("a", "b", got), s.name) == v, (command, s.option)
    if s.prompt:
        line = parse_prompt_text(f"a -> b {s.prompt}={as_text(v)}")[0]
        assert getattr(finetune_config(line, job, None), s.name) == v
    if s.spec:
        spec = FinetuneSpec(**{s.spec: v})
        assert getattr(finetune_config(parse_prompt_text("a -> b")[0],
                                       dataclasses.replace(job, settings=spec.settings()), None), s.name) == v
    else:  # t0 and S_inv of a workflow are its latents' (the store must match them)
        assert s.name in ("t0", "n_inv_steps") and {"t0", "n_inv"} <= set(LatentsSpec.model_fields)


@pytest.mark.parametrize("s", [s for s in SETTINGS if bad_value(s) is not None], ids=lambda s: s.name)
def test_a_bad_value_is_refused_by_the_same_rule_everywhere(s):
    bad = bad_value(s)
    with pytest.raises(ConfigError, match=s.name):
        FinetuneConfig("a", "b", **{s.name: bad})
    for command in COMMANDS:
        with pytest.raises(ConfigError, match=f"{s.option} .*expected {s.rule()}"):
            cli_settings(command, [s.option, as_text(bad)])
    if s.prompt:
        with pytest.raises(ConfigError, match=f"bad value .* for {s.prompt}; expected {s.rule()}"):
            parse_prompt_text(f"a -> b {s.prompt}={as_text(bad)}")
    if s.spec:
        with pytest.raises(ValueError):
            FinetuneSpec(**{s.spec: bad})


def test_the_t0_rule_line_then_job_then_preset_then_default():
    toy = get_preset("toy_shapes")
    assert toy.t0 is not None
    assert resolve_finetune_config("a", "b").t0 == 500
    assert resolve_finetune_config("a", "b", preset=toy).t0 == toy.t0
    assert resolve_finetune_config("a", "b", {"t0": 450}, preset=toy).t0 == 450
    assert resolve_finetune_config("a", "b", {"t0": 300}, {"t0": 450}, preset=toy).t0 == 300
    assert resolve_finetune_config("a", "b", {"t0": None}, {"t0": 450}).t0 == 450
    with pytest.raises(ConfigError, match="unknown fine-tuning setting 'lrr'"):
        resolve_finetune_config("a", "b", {"lrr": 1})


def test_finetune_many_takes_the_identity_loss_with_face_weights():
    line = parse_prompt_text("face -> angry face id=0.5")[0]
    with pytest.raises(ConfigError, match="needs --face-weights"):
        finetune_config(line, FinetuneManyJob(prompts="p", model="m", out="o"), None)
    cfg = finetune_config(line, FinetuneManyJob(prompts="p", model="m", out="o", face_weights="f.pt"), None)
    assert cfg.w_id == 0.5
