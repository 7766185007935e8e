"""Each setting is declared once (dclip_ray.config: FinetuneConfig, PrecomputeConfig, RestyleSettings,
Resources) and reaches every surface: the options of the commands that take it, the prompt line
(per-prompt fine-tuning settings) and the workflow spec, with the same default and the same rule
(issue 18 item 1). The t0 rule lives in one function."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from dclip_ray.cli import app
from dclip_ray.cli.settings import PREFIX, collect
from dclip_ray.config import (
    CONFIGS,
    NOT_IN_SPEC,
    SHARED,
    FinetuneConfig,
    SettingInfo,
    resolve_finetune_config,
    settings_of,
)
from dclip_ray.errors import ConfigError
from dclip_ray.models import get_preset
from dclip_ray.prompts import parse_prompt_text
from dclip_ray.stages.finetune_many import FinetuneManyJob, finetune_config
from dclip_ray.workflow import parse_spec
from dclip_ray.workflow.spec import FinetuneSpec

ALL = [(cls, s) for cls in CONFIGS for s in settings_of(cls)]
IDS = [f"{cls.__name__}.{s.name}" for cls, s in ALL]
SETTINGS = settings_of(FinetuneConfig)
REQUIRED = {"finetune": ["--model", "m", "--source", "a", "--target", "b", "--images", "i", "--out", "o"],
            "finetune-many": ["p.txt", "--model", "m", "--out", "o"],
            "precompute": ["--model", "m", "--input", "i", "--out", "o"],
            "restyle": ["--input", "i", "--out", "o"],
            "edit": ["--model", "m", "--images", "i", "--out", "o"],
            "latent-optim": ["--model", "m", "--source", "a", "--target", "b", "--images", "i", "--out", "o"],
            "translate": ["--model", "m", "--images", "i", "--out", "o"],
            "from-strokes": ["--model", "m", "--images", "i", "--out", "o"],
            "eval": ["--before", "b", "--after", "a"], "verify": ["o", "--input", "i"], "report": ["r"],
            "demo": [], "run": ["s.yaml"], "submit": ["s.yaml", "--address", "a"],
            "status": ["j", "--address", "a"], "convert": ["c.ckpt", "--out", "o"]}
MINIMAL_SPEC = {"name": "t", "input": {"toyworld": {"n": 4}}, "model": "toy_shapes", "prompts": ["a -> b name=x"],
                "outputs": {"root": "/tmp/never-written"}}


def commands_taking(cls: type, s: SettingInfo) -> list[tuple[str, str]]:
    """(command, the keyword it hands the values as) for every command with this setting as an option."""
    out = []
    for name, cmd in typer.main.get_command(app).commands.items():
        for p in cmd.params:
            if p.name and p.name.startswith(PREFIX) and p.name.endswith(f"__{s.name}") and s.option in p.opts:
                kw = p.name[len(PREFIX):].split("__")[0]
                if {x.name for x in settings_of(cls)} >= {q.name.split("__")[-1] for q in cmd.params
                                                         if q.name.startswith(f"{PREFIX}{kw}__")}:
                    out.append((name, kw))
    return out


def given(command: str, kw: str, cls: type, extra: list[str]) -> dict:
    cmd = typer.main.get_command(app).commands[command]
    return collect(cmd.make_context(command, REQUIRED[command] + extra).params, cls, kw)


def good_value(s: SettingInfo):
    """A valid value that is not the default."""
    if s.choices is not None:
        return next(c for c in s.choices if c and c != s.default and c != "none")
    if s.type is bool:
        return not s.default
    if s.type is str:
        return "/x.pt"  # absolute: a spec resolves a relative path against its folder
    if s.type is int:
        v = int(s.lo or 0) + 2
        return v if v != s.default else v + 1
    v = (s.default or 0.0) * 2 + 0.5
    return v if s.hi is None or v <= s.hi else (s.hi + (s.lo or 0)) / 3


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


def as_text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def flag(s: SettingInfo, v) -> list[str]:
    return ([s.option] if v else [f"--no-{s.cli}"]) if s.type is bool else [s.option, as_text(v)]


def spec_with(path: str, value) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MINIMAL_SPEC.items()}
    if "." not in path:
        return {**raw, path: value}
    section, key = path.rsplit(".", 1)
    raw.setdefault(section, {})[key] = value
    return raw


def from_spec(cls: type, spec) -> dict:
    """The values of ``cls``'s settings that a parsed workflow spec gives the stage."""
    if cls is FinetuneConfig:
        return {"t0": spec.latents.t0, "n_inv_steps": spec.latents.n_inv, **spec.finetune.settings()}
    made = {"PrecomputeConfig": spec.precompute_config, "RestyleSettings": spec.restyle_settings,
            "Resources": spec.resources, "TrainingSets": spec.training_sets,
            "QualityCheck": spec.quality_check, "RunOptions": spec.run_options}[cls.__name__]()
    return dataclasses.asdict(made)


def test_every_field_is_a_declared_setting_with_one_name_per_config():
    assert [f.name for f in dataclasses.fields(FinetuneConfig)] == ["source", "target"] + [s.name for s in SETTINGS]
    for cls in CONFIGS:
        ss = settings_of(cls)
        if cls is not FinetuneConfig:
            assert [f.name for f in dataclasses.fields(cls)] == [s.name for s in ss]
        assert len({s.cli for s in ss}) == len(ss), cls
    per_prompt = {s.name for s in SETTINGS if s.prompt}
    assert {"aug_views", "aug_blur", "w_global", "clip_form", "w_id", "t0", "lr"} <= per_prompt


@pytest.mark.parametrize("name", sorted(SHARED))
def test_a_shared_setting_has_one_name_and_rule_in_every_stage(name):
    decls = [s for _, s in ALL if s.name == name and s.cli == SHARED[name]["cli"]]
    assert len(decls) >= 2, f"{name} is shared by at least two stages"
    assert len({(s.cli, s.type, s.lo, s.lo_strict, s.hi, s.choices) for s in decls}) == 1


@pytest.mark.parametrize(("cls", "s"), ALL, ids=IDS)
def test_a_setting_given_nowhere_takes_the_declared_default_on_every_surface(cls, s):
    assert getattr(cls("a", "b") if cls is FinetuneConfig else cls(), s.name) == s.default
    takers = commands_taking(cls, s)
    assert takers, f"{s.option} is an option of no command"
    for command, kw in takers:
        assert s.name not in given(command, kw, cls, []), "an option not given is not a setting given"
        assert getattr(cls("a", "b", **given(command, kw, cls, [])) if cls is FinetuneConfig
                       else cls(**given(command, kw, cls, [])), s.name) == s.default
    if s.spec is None:
        assert (cls.__name__, s.name) in NOT_IN_SPEC or (cls is FinetuneConfig and s.name in ("t0", "n_inv_steps"))
        return
    spec = parse_spec(MINIMAL_SPEC, here="/tmp")
    if cls is FinetuneConfig and s.spec_section == "finetune":
        assert s.name not in spec.finetune.settings()
        line = parse_prompt_text("a -> b")[0]
        assert getattr(finetune_config(line, FinetuneManyJob(prompts="p", model="m", out="o"), None), s.name) == s.default
    else:
        assert from_spec(cls, spec)[s.name] == s.default


@pytest.mark.parametrize(("cls", "s"), ALL, ids=IDS)
def test_a_setting_reaches_the_stage_from_every_surface(cls, s):
    v = good_value(s)
    for command, kw in commands_taking(cls, s):
        assert given(command, kw, cls, flag(s, v))[s.name] == v, (command, s.option)
    if s.prompt:
        job = FinetuneManyJob(prompts="p", model="m", out="o", face_weights="f.pt")
        line = parse_prompt_text(f"a -> b {s.prompt}={as_text(v)}")[0]
        assert getattr(finetune_config(line, job, None), s.name) == v
    if s.spec:
        spec = parse_spec(spec_with(s.spec, v), here="/tmp")
        assert from_spec(cls, spec)[s.name] == v, s.spec


@pytest.mark.parametrize(("cls", "s"), [(c, s) for c, s in ALL if bad_value(s) is not None],
                         ids=lambda x: x.name if isinstance(x, SettingInfo) else x.__name__)
def test_a_bad_value_is_refused_by_the_same_rule_everywhere(cls, s):
    bad = bad_value(s)
    with pytest.raises(ConfigError, match=s.name):
        cls("a", "b", **{s.name: bad}) if cls is FinetuneConfig else cls(**{s.name: bad})
    for command, kw in commands_taking(cls, s):
        with pytest.raises(ConfigError, match=f"{s.option} .*expected {s.rule()}"):
            given(command, kw, cls, [s.option, as_text(bad)])
    if s.prompt:
        with pytest.raises(ConfigError, match=f"bad value .* for {s.prompt}; expected {s.rule()}"):
            parse_prompt_text(f"a -> b {s.prompt}={as_text(bad)}")
    if s.spec:
        with pytest.raises(ConfigError, match=f"workflow spec .*: {s.spec}: must be"):
            parse_spec(spec_with(s.spec, bad), here="/tmp")


def test_the_spec_sections_are_built_from_the_declarations():
    """No spec field repeats a setting by hand: each section's setting fields are exactly the declared
    settings with that spec path (finetune-section settings are optional: None = not given)."""
    from dclip_ray.workflow import spec as spec_mod

    declared = {s.spec for _, s in ALL if s.spec}
    for section, model in (("input", spec_mod.InputSpec), ("latents", spec_mod.LatentsSpec),
                           ("finetune", FinetuneSpec), ("restyle", spec_mod.RestyleSpec), ("ray", spec_mod.RaySpec)):
        own = {"input": {"url", "toyworld"}, "latents": {"store"}, "ray": {"num_cpus"},
               "restyle": {"variants", "mix"}, "finetune": set()}
        fields = set(model.model_fields) - own[section]
        assert {f"{section}.{f}" for f in fields} == {p for p in declared if p.startswith(f"{section}.")}, section
    top = set(spec_mod.WorkflowSpec.model_fields) - {"name", "input", "model", "prompts", "latents", "finetune",
                                                     "restyle", "outputs", "ray", "source"}
    assert top == {p for p in declared if "." not in p} == {"preset"}


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


def test_the_restyle_pool_is_sized_from_the_cluster_by_one_rule():
    """Cluster CPUs/GPUs in, (actors, CPUs per actor, why) out: one per CPU (half a CPU each when they
    take every CPU), one per --gpus-per-actor GPUs, or --actors; the reason names the rule."""
    from dclip_ray.config import Resources

    assert Resources().restyle_pool(4)[:2] == (4, 0.5), "one actor per CPU, each half a CPU: reads are never starved"
    assert Resources().restyle_pool(64)[0] == 64, "a cluster's CPUs, not the driver's"
    assert Resources(actors=2).restyle_pool(4)[:2] == (2, 1.0)
    assert Resources(gpus_per_actor=1.0).restyle_pool(16, gpus=2)[:2] == (2, 1.0)
    assert Resources(gpus_per_actor=0.5).restyle_pool(16, gpus=4)[0] == 8, "two actors share each GPU"
    actors, _, why = Resources(gpus_per_actor=1.0).restyle_pool(16, gpus=0)
    assert actors == 1 and "no GPU" in why
    assert Resources(actors=3, cpus_per_actor=2.0).restyle_pool(4)[:2] == (3, 2.0)
    assert "one per CPU of the cluster's 64" in Resources().restyle_pool(64)[2]




def test_a_pool_at_an_address_may_grow_to_one_actor_per_shard_and_an_embedded_one_stays(monkeypatch):
    """At an address (an autoscaling cluster may add nodes) and without --actors, the pool starts sized
    from the cluster and may grow to one actor per shard to do; an embedded Ray, or --actors, keeps it."""
    from dclip_ray.pipeline.restyle import RestyleJob, pool_size

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = {"CPU": 8.0}
    joined = pool_size(RestyleJob(None, "in", address="10.0.0.1:6379"), cluster, n_shards=100)
    assert (joined["actors"], joined["max_actors"]) == (8, 100) and "may grow to 100" in joined["why"]
    assert pool_size(RestyleJob(None, "in", address="h:1"), cluster, n_shards=3)["max_actors"] == 8, \
        "never fewer than it starts"
    assert pool_size(RestyleJob(None, "in", address="h:1", actors=4), cluster, n_shards=100)["max_actors"] == 4
    embedded = pool_size(RestyleJob(None, "in"), cluster, n_shards=100)
    assert embedded["max_actors"] == 8 and "grow" not in embedded["why"]
    monkeypatch.setenv("RAY_ADDRESS", "h:1")  # a Ray job's driver
    assert pool_size(RestyleJob(None, "in"), cluster, n_shards=100)["max_actors"] == 100


def test_a_gpu_resource_maps_to_cuda_unless_a_rehearsal_maps_it_to_the_cpu(monkeypatch):
    from dclip_ray.stages.common import device_for

    monkeypatch.delenv("DCLIP_RAY_ACCELERATOR", raising=False)
    assert (device_for(0), device_for(0.5)) == ("cpu", "cuda")
    monkeypatch.setenv("DCLIP_RAY_ACCELERATOR", "cpu")
    assert device_for(1) == "cpu"
    monkeypatch.setenv("DCLIP_RAY_ACCELERATOR", "tpu")
    with pytest.raises(ValueError, match="DCLIP_RAY_ACCELERATOR='tpu' should be 'cuda' or 'cpu'"):
        device_for(1)
