"""Model combinations: edit strength and gamma(t) mixing (eq. 14)."""

from __future__ import annotations

import pytest
import torch

from dclip_ray.diffusion import generate, linear_schedule
from dclip_ray.errors import ConfigError
from dclip_ray.mixing import gamma_from_spec, mixed_eps_fn, strength_eps_fn, validate_gamma


def const_eps(value: float, counter: list | None = None):
    def fn(x, t):
        if counter is not None:
            counter.append(int(t[0]))
        return torch.full_like(x, value)

    return fn


def test_official_hybrid_table_semantics():
    g = gamma_from_spec({"type": "piecewise", "table": {300: [1, 0], 0: [0.3, 0.7]}})
    assert g.weights(999) == [1.0, 0.0]
    assert g.weights(300) == [1.0, 0.0]
    assert g.weights(299) == [0.3, 0.7]
    assert g.weights(0) == [0.3, 0.7]


def test_ramp_and_constant():
    ramp = gamma_from_spec({"type": "ramp", "start": {"t": 500, "weights": [1, 0]}, "end": {"t": 100, "weights": [0, 1]}})
    assert ramp.weights(900) == [1.0, 0.0]
    assert ramp.weights(300) == pytest.approx([0.5, 0.5])
    assert ramp.weights(0) == [0.0, 1.0]
    assert gamma_from_spec({"type": "constant", "weights": [0.25, 0.75]}).weights(7) == [0.25, 0.75]


def test_validation_names_the_step():
    bad_sum = gamma_from_spec({"type": "piecewise", "table": {400: [0.5, 0.6], 0: [0.5, 0.5]}})
    with pytest.raises(ConfigError, match=r"t=999 sum to 1\.1"):
        validate_gamma(bad_sum, 2, range(999, -1, -1))
    validate_gamma(bad_sum, 2, range(0, 400))  # the rows in range are fine
    with pytest.raises(ConfigError, match="3 weights for 2 models"):
        validate_gamma(gamma_from_spec({"type": "constant", "weights": [0.2, 0.3, 0.5]}), 2, [0])
    no_zero = gamma_from_spec({"type": "piecewise", "table": {300: [1, 0]}})
    with pytest.raises(ConfigError, match="t=299"):
        mixed_eps_fn([const_eps(0), const_eps(1)], no_zero)
    with pytest.raises(ConfigError, match="gamma.type"):
        gamma_from_spec({"type": "cosine"})
    with pytest.raises(ConfigError, match="numbers"):
        gamma_from_spec({"type": "constant", "weights": ["a", "b"]})


def test_mixed_eps_is_the_weighted_sum_and_skips_zero_weights():
    calls_a, calls_b = [], []
    g = gamma_from_spec({"type": "piecewise", "table": {300: [1, 0], 0: [0.3, 0.7]}})
    fn = mixed_eps_fn([const_eps(1.0, calls_a), const_eps(-2.0, calls_b)], g)
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(fn(x, torch.full((2,), 500)), torch.full_like(x, 1.0))
    assert torch.allclose(fn(x, torch.full((2,), 100)), torch.full_like(x, 0.3 - 1.4))
    assert calls_a == [500, 100] and calls_b == [100], "a zero-weight model must not be evaluated"
    # Per-item timesteps are honoured too.
    mixed_t = fn(x, torch.tensor([500, 100]))
    assert torch.allclose(mixed_t[0], torch.full_like(x[0], 1.0)) and torch.allclose(mixed_t[1], torch.full_like(x[1], -1.1))


def test_strength_interpolates_and_evaluates_only_what_it_needs():
    calls_o, calls_f = [], []
    orig, ft = const_eps(0.0, calls_o), const_eps(1.0, calls_f)
    x = torch.zeros(1, 3, 2, 2)
    t = torch.zeros(1, dtype=torch.long)
    assert torch.allclose(strength_eps_fn(orig, ft, 0.25)(x, t), torch.full_like(x, 0.25))
    calls_o.clear()
    strength_eps_fn(orig, ft, 1.0)(x, t)
    assert calls_o == []
    with pytest.raises(ConfigError, match="strength"):
        strength_eps_fn(orig, ft, 1.5)


def test_mixing_inside_generation_changes_models_at_the_threshold():
    sched = linear_schedule()
    seen = []

    def tagged(tag):
        def fn(x, t):
            seen.append((tag, int(t[0])))
            return torch.zeros_like(x)

        return fn

    g = gamma_from_spec({"type": "piecewise", "table": {300: [1, 0], 0: [0, 1]}})
    generate(mixed_eps_fn([tagged("a"), tagged("b")], g), torch.zeros(1, 3, 2, 2), 500, 6, sched)
    assert seen == [("a", 500), ("a", 400), ("a", 300), ("b", 200), ("b", 100), ("b", 0)]


def test_mix_file_loads_resolves_relative_models_and_names_bad_fields(tmp_path):
    from dclip_ray.errors import InputFileError
    from dclip_ray.mixing import load_mix_spec

    (tmp_path / "models" / "blue").mkdir(parents=True)
    good = tmp_path / "mix.yaml"
    good.write_text("models: [models/blue, /abs/square]\n"
                    "gamma: {type: ramp, start: {t: 500, weights: [1, 0]}, end: {t: 0, weights: [0, 1]}}\n")
    spec = load_mix_spec(str(good))
    assert spec.models == (str(tmp_path / "models" / "blue"), "/abs/square")
    assert spec.schedule().weights(250) == [0.5, 0.5]
    cases = {
        "models: [a]\ngamma: {type: constant, weights: [0.5, 0.5]}\n": "2 weights for 1 models",
        "models: [a, b]\ngamma: {type: constant, weights: [0.5, 0.6]}\n": "sum to 1.1",
        "models: []\ngamma: {type: constant, weights: [1]}\n": "'models' must be a non-empty list",
        "models: [a]\nweights: [1]\n": "unknown field(s) weights",
        "models: [a]\ngamma: {type: cubic}\n": "gamma.type='cubic'",
    }
    for text, needle in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_mix_spec(str(bad))
        assert needle in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputFileError, match="not found"):
        load_mix_spec(str(tmp_path / "missing.yaml"))
    (tmp_path / "broken.yaml").write_text("models: [a\n")
    with pytest.raises(InputFileError, match="not readable YAML"):
        load_mix_spec(str(tmp_path / "broken.yaml"))


@pytest.mark.parametrize("gamma", [{"type": "constant", "weights": [0.25, 0.75]},
                                   {"type": "ramp", "start": {"t": 500, "weights": [1, 0]},
                                    "end": {"t": 0, "weights": [0, 1]}}])
def test_restyle_and_edit_build_the_same_mix_at_a_strength(tmp_path, gamma):
    """One builder for a mix's output: `restyle --mix M --strength 0.5` weights the base 0.5 beside the mix
    as `edit --mix M --strength 0.5` does (restyle used to ignore the strength), and at strength 1 both
    give the mix alone."""
    from pipeline_fixtures import tiny_unet_dir

    from dclip_ray.config import RestyleSettings
    from dclip_ray.mixing import mix_from_data
    from dclip_ray.models.card import read_card
    from dclip_ray.stages.edit import EditJob, _variant
    from dclip_ray.stages.restyle_config import build_restyle_config

    base = tiny_unet_dir(tmp_path / "base", 0)
    models = [tiny_unet_dir(tmp_path / n, i, {"base_model": base, "config": {"t0": 300}, "source": "a", "target": n})
              for i, n in enumerate(("b", "c"), start=1)]
    mix = {"models": models, "gamma": gamma}
    for r in (0.5, 1.0):
        cfg = build_restyle_config(str(tmp_path / "out"), base=base, mix=mix, settings=RestyleSettings(strength=r))
        edit = _variant(EditJob(model=base, finetuned=None, images="x", out="y", settings=RestyleSettings(strength=r)),
                        mix_from_data(mix, "mix"), "state", [read_card(m) for m in models], 300)
        (v,) = cfg.variants
        assert (v.models, v.gamma, v.description, v.edits) == (edit.models, edit.gamma, edit.description, edit.edits)
        assert v.t0 == edit.t0 == 300, "the t0 the models' cards agree on: the variant's own, the only one"
        assert v.models == ([0, 1, 2] if r < 1 else [1, 2])
    assert gamma["type"] != "constant" or v.gamma == gamma
