"""The DDIM engine against hand-computed values, an exactly solvable ODE, and diffusers' DDIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dclip_ray.diffusion import (
    add_noise,
    ddim_step,
    generate,
    generation_pairs,
    inversion_pairs,
    invert,
    linear_schedule,
    schedule_from_config,
    time_sequence,
)
from dclip_ray.errors import ConfigError

SCHED = linear_schedule()


def np_alpha_bar(t: int) -> float:
    """Independent numpy computation of alpha_bar with alpha_bar(-1) = 1."""
    if t < 0:
        return 1.0
    betas = np.linspace(1e-4, 2e-2, 1000)
    return float(np.prod(1.0 - betas[: t + 1]))


class CountingEps:
    def __init__(self, fn):
        self.fn, self.calls, self.ts = fn, 0, []

    def __call__(self, x, t):
        self.calls += 1
        self.ts.append(int(t[0]))
        return self.fn(x, t)


def point_mass_eps(c: torch.Tensor):
    """The exact eps of a data distribution that is the single point c (per batch item)."""

    def eps_fn(x, t):
        a = SCHED.alpha_bar[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    return eps_fn


def test_schedule_matches_numpy_and_diffusers():
    from diffusers import DDPMScheduler

    assert SCHED.num_timesteps == 1000
    for t in (-1, 0, 1, 299, 500, 999):
        assert SCHED.alpha_bar_at(t) == pytest.approx(np_alpha_bar(t), rel=1e-12)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear")
    from_cfg = schedule_from_config(dict(ref.config))
    assert torch.allclose(from_cfg.alpha_bar.float(), ref.alphas_cumprod, rtol=1e-6)
    with pytest.raises(ConfigError, match="squaredcos"):
        schedule_from_config({"beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ConfigError):
        SCHED.alpha_bar_at(1000)


def test_official_time_sequences_and_call_counts():
    assert time_sequence(500, 6) == [0, 100, 200, 300, 400, 500]
    assert time_sequence(601, 40)[:3] == [0, 15, 30] and time_sequence(601, 40)[-1] == 601
    assert inversion_pairs(500, 6) == [(0, 100), (100, 200), (200, 300), (300, 400), (400, 500)]
    assert generation_pairs(500, 6) == [(500, 400), (400, 300), (300, 200), (200, 100), (100, 0), (0, -1)]
    x = torch.zeros(2, 3, 4, 4)
    for n_inv, n_gen in ((40, 40), (40, 6), (2, 2)):
        inv, gen = CountingEps(lambda x, t: 0.1 * x), CountingEps(lambda x, t: 0.1 * x)
        invert(inv, x, 500, n_inv, SCHED)
        generate(gen, x, 500, n_gen, SCHED)
        assert inv.calls == n_inv - 1, "inversion makes n - 1 network calls"
        assert gen.calls == n_gen, "generation makes n network calls"
        assert inv.ts[0] == 0 and gen.ts[0] == 500 and gen.ts[-1] == 0


def test_ddim_step_equals_hand_computed_values():
    # eps_fn(x, t) = 0.5 x, x = 1: every quantity is a closed-form scalar.
    eps_fn = lambda x, t: 0.5 * x  # noqa: E731
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    for t, t_next in ((0, 100), (500, 400), (250, 500), (0, -1), (999, 0)):
        a, an = np_alpha_bar(t), np_alpha_bar(t_next)
        x0_hand = (1 - math.sqrt(1 - a) * 0.5) / math.sqrt(a)
        x_next_hand = math.sqrt(an) * x0_hand + math.sqrt(1 - an) * 0.5
        x_next, x0_pred, eps = ddim_step(eps_fn, x, t, t_next, SCHED)
        assert float(eps) == 0.5
        assert float(x0_pred) == pytest.approx(x0_hand, rel=1e-12)
        assert float(x_next) == pytest.approx(x_next_hand, rel=1e-12)
    # The last generation step lands on x0_pred exactly (alpha_bar(-1) = 1), no clipping of large values.
    big = torch.full((1, 1, 1, 1), 50.0, dtype=torch.float64)
    x_last, x0_pred, _ = ddim_step(eps_fn, big, 0, -1, SCHED)
    assert torch.equal(x_last, x0_pred) and float(x_last) > 1.0


def test_stochastic_step_equals_hand_computed_values():
    eps_fn = lambda x, t: 0.5 * x  # noqa: E731
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    z = torch.full_like(x, 0.3)
    t, t_next, eta = 500, 400, 0.7
    a, an = np_alpha_bar(t), np_alpha_bar(t_next)
    x0 = (1 - math.sqrt(1 - a) * 0.5) / math.sqrt(a)
    c1 = eta * math.sqrt((1 - a / an) * (1 - an) / (1 - a))
    c2 = math.sqrt(1 - an - c1**2)
    x_next, _, _ = ddim_step(eps_fn, x, t, t_next, SCHED, eta=eta, noise=z)
    assert float(x_next) == pytest.approx(math.sqrt(an) * x0 + c2 * 0.5 + c1 * 0.3, rel=1e-12)


def test_generation_step_matches_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(10)  # timesteps 900, 800, ..., 0: each step moves t -> t - 100
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    eps = torch.randn(2, 3, 8, 8, generator=g)
    for t in (900, 500, 100, 0):
        ref = sched.step(eps, t, x, eta=0.0).prev_sample
        ours, _, _ = ddim_step(lambda x_, t_: eps, x, t, t - 100 if t > 0 else -1, SCHED)
        assert torch.allclose(ours, ref, atol=1e-5), t


@pytest.mark.parametrize(("n_inv", "n_gen"), [(40, 40), (40, 6), (3, 17)])
def test_inversion_then_generation_is_exact_for_a_point_mass(n_inv, n_gen):
    g = torch.Generator().manual_seed(1)
    c = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps_fn = point_mass_eps(c)
    x_t0 = invert(eps_fn, c, 500, n_inv, SCHED)
    # Along the exact ODE eps is constant: x_t0 is known in closed form.
    a0, a500 = np_alpha_bar(0), np_alpha_bar(500)
    e = (c - math.sqrt(a0) * c) / math.sqrt(1 - a0)
    assert torch.allclose(x_t0, math.sqrt(a500) * c + math.sqrt(1 - a500) * e, atol=1e-10)
    x0 = generate(eps_fn, x_t0, 500, n_gen, SCHED)
    assert (x0 - c).abs().max().item() < 1e-10


def test_a_batch_equals_its_items_one_by_one():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def eps_fn(x, t):
        return torch.tanh(conv(x)) * (1 + t.view(-1, 1, 1, 1) / 1000)

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        lat = invert(eps_fn, x, 400, 10, SCHED)
        out = generate(eps_fn, lat, 400, 7, SCHED)
        for i in range(4):
            lat_i = invert(eps_fn, x[i : i + 1], 400, 10, SCHED)
            out_i = generate(eps_fn, lat_i, 400, 7, SCHED)
            assert torch.allclose(lat[i : i + 1], lat_i, atol=1e-6)
            assert torch.allclose(out[i : i + 1], out_i, atol=1e-6)


def test_seeded_stochastic_generation_is_reproducible_and_inversion_refuses_eta():
    eps_fn = lambda x, t: 0.1 * x  # noqa: E731
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    a = generate(eps_fn, x, 500, 10, SCHED, eta=0.5, generator=torch.Generator().manual_seed(7))
    b = generate(eps_fn, x, 500, 10, SCHED, eta=0.5, generator=torch.Generator().manual_seed(7))
    c = generate(eps_fn, x, 500, 10, SCHED, eta=0.5, generator=torch.Generator().manual_seed(8))
    d = generate(eps_fn, x, 500, 10, SCHED, eta=0.0)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3 and (a - d).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="inversion"):
        ddim_step(eps_fn, x, 100, 200, SCHED, eta=0.5)


def test_add_noise_is_eq1():
    x0 = torch.full((20000, 1, 1, 1), 0.5, dtype=torch.float64)
    w = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = np_alpha_bar(300)
    assert torch.allclose(add_noise(x0, 300, SCHED, noise=w), math.sqrt(a) * x0 + math.sqrt(1 - a) * w)
    x_t = add_noise(x0, 300, SCHED, generator=torch.Generator().manual_seed(1))
    assert x_t.mean().item() == pytest.approx(0.5 * math.sqrt(a), abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.05)


def test_gradients_flow_through_generation_and_callback_sees_every_step():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    x_lat = torch.randn(2, 3, 8, 8, requires_grad=True)
    seen = []
    out = generate(lambda x, t: conv(x), x_lat, 300, 4, SCHED, callback=lambda d: seen.append((d["t"], d["t_next"])))
    out.square().mean().backward()
    assert seen == [(300, 200), (200, 100), (100, 0), (0, -1)]
    assert x_lat.grad is not None and x_lat.grad.abs().sum() > 0
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_bad_arguments_are_config_errors():
    eps_fn = lambda x, t: x  # noqa: E731
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ConfigError, match="t0=1000"):
        invert(eps_fn, x, 1000, 10, SCHED)
    with pytest.raises(ConfigError, match="n_steps=1"):
        generate(eps_fn, x, 500, 1, SCHED)
    with pytest.raises(ConfigError, match="eta"):
        generate(eps_fn, x, 500, 5, SCHED, eta=-0.1)
