"""DiffusionCLIP works on the toy world, judged from pixels (never by CLIP).

Acceptance (issue 5): with 16 training images and at most 5 epochs,
- "red circle" -> "blue circle" at t0 = 500 turns >= 90 % of 32 held-out red circles blue, in place
  (shape-mask IoU) and with the background kept (mean absolute error / 255 outside the mask);
- "red circle" -> "red square" (t0 >= 500) succeeds on >= 80 % with the colour kept.

Red -> blue uses the position-aware toy CLIP (see dclip_ray/toyworld/weights/TOY_CLIP.md), the
edge-structure loss and a refinement stage: pixel edges and L1 0.5 for two epochs, so the colour
changes, then edges at three scales and L1 1.5, so the outline settles in place.

Measured spread (issue 17; 2026-12-01, 2 shared cores, torch 2.14.1; the settings below, seed = the
fine-tuning seed, training and held-out images fixed), blue circles / mean IoU / background error:

    seed 0: 31/32, 0.858,  4.4/255   (earlier runs of seed 0: 32/32, 0.874, 5.1; a clean clone: 0.847)
    seed 1: 32/32, 0.858,  2.7/255   (earlier: 0.835, 2.0)
    seed 2: 29/32, 0.875,  5.5/255   (earlier: 29/32, 0.875, 5.5)
    seed 3: 31/32, 0.829,  2.5/255   (earlier: 0.828, 2.5)
    seed 4: 31/32, 0.813, 11.0/255
    the untrained model: 0/32 blue (32/32 red circles), IoU 0.983, 0.9/255

So the old bounds (IoU >= 0.85, background <= 6/255) sat on the measured values: IoU 0.85 fails at
seeds 3 and 4 and wobbled around 0.85 at seed 0 between machines, and the background goal of 6/255 is
met at 4 of 5 seeds (seed 4 tints the whole background by 11/255; a stronger refinement L1, 2.0, fixed
seed 4 (2.3/255) but gave 7.2 and 8.5/255 at seeds 3 and 0 (5.6 at seed 2), so the settings are
kept). The bounds now:

- `make test` (one fine-tuning: 41 s here, 32 s of it training): seed 0, >= 90 % blue circles (the
  acceptance), mean IoU >= 0.80, background <= 8/255. Margins at seed 0: 2 images, 0.06 IoU, 3.6/255.
  It keeps all 16 training images, 5 epochs and all 32 held-out images: generating and judging 32
  edits takes ~3 s, and fewer images would only make the 90 % bound noisier.
- `make test-slow`: seeds 1-4, each >= 85 % blue, IoU >= 0.78, background <= 13/255 (worst measured:
  29/32, 0.813, 11.0/255), and over the 128 edits together >= 90 % blue, IoU >= 0.82, background
  <= 7/255 (measured 96 %, 0.844, 5.4/255).

They still fail for a broken edit: the untrained model makes 0/32 blue (asserted below); a model that
shrinks the discs (L1 alone, no edge loss) had IoU 0.58, and pixel edges without the refinement stage
0.77, 0.76, 0.70 at seeds 0-2, all below 0.80.

Circle -> square needs full mode, up-down + left-right flips of the CLIP views (without them only the
top corners get squared), 10 generation steps, a stronger CLIP weight, view noise 0.1 and t0 = 550:
28/32 red squares (88 %), background 4.5/255 at seed 0; seeds 1-4 give 26, 28, 26 and 21/32 (at t0 = 500
seeds 0-2 gave 27, 17 and 22/32). The 80 % bound holds at seed 0 with a margin of 2 images and fails at
seed 4: it is asserted at seed 0 only, in the slow suite, and is not robust over seeds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dclip_ray.diffusion import schedule_from_config
from dclip_ray.edit import generate_images, invert_images
from dclip_ray.finetune import FinetuneConfig, finetune
from dclip_ray.models import eps_fn_of, load_clip, load_schedule_config, load_unet
from dclip_ray.toyworld import judge, sample_dataset

SETTINGS = {
    "blue": dict(source="red circle", target="blue circle", t0=500, n_gen_steps=6, epochs=5, lr=5e-5,
                 w_l1=0.5, w_edge=8.0, aug_views=8, aug_shift=4, aug_noise=0.2, seed=0,
                 refine_from=2, refine_l1=1.5, refine_edge_scales=3),
    "square": dict(source="red circle", target="red square", t0=550, n_gen_steps=10, mode="full", epochs=5,
                   lr=1e-4, w_clip=5.0, w_l1=2.0, aug_views=8, aug_shift=4, aug_noise=0.1, aug_flip="hv", seed=0),
}
ROBUSTNESS_SEEDS = (1, 2, 3, 4)  # seed 0 is the fast test's


def images(samples) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    unet = load_unet("toy_shapes")
    sched = schedule_from_config(load_schedule_config("toy_shapes"))
    clip = load_clip("toy_clip")
    train = sample_dataset(16, seed=101, colours=["red"], shapes=["circle"])
    held_out = sample_dataset(32, seed=202, colours=["red"], shapes=["circle"])
    return dict(unet=unet, sched=sched, clip=clip, x_train=images(train), x_eval=images(held_out),
                held_out=held_out, latents={})


def latents(world, t0):
    """DDIM latents (40 inversion steps) of the training and held-out images at ``t0``, cached."""
    if t0 not in world["latents"]:
        eps = eps_fn_of(world["unet"])
        world["latents"][t0] = (invert_images(eps, world["x_train"], t0, 40, world["sched"], batch_size=16),
                                invert_images(eps, world["x_eval"], t0, 40, world["sched"], batch_size=32))
    return world["latents"][t0]


_CACHE: dict = {}


def judged(world, eps_fn, t0):
    """The judge's verdicts on the 32 held-out red circles generated by ``eps_fn`` from their latents."""
    out = generate_images(eps_fn, latents(world, t0)[1], t0, 40, world["sched"], batch_size=32)
    return [judge(o, ref_mask=s.mask) for o, s in zip(out, world["held_out"], strict=True)]


def edit_and_judge(world, key, seed=0):
    """Fine-tune with ``SETTINGS[key]`` at fine-tuning seed ``seed`` and judge the held-out edits (cached)."""
    if (key, seed) not in _CACHE:
        cfg = FinetuneConfig(**{**SETTINGS[key], "seed": seed})
        res = finetune(world["unet"], world["clip"], world["x_train"], latents(world, cfg.t0)[0], world["sched"], cfg)
        _CACHE[key, seed] = judged(world, eps_fn_of(res.unet), cfg.t0)
    return _CACHE[key, seed]


def blue_failures(verdicts, min_blue=0.90, min_iou=0.80, max_bg=8.0):
    """The red -> blue bounds ``verdicts`` miss (empty when all hold), with the measured values."""
    blue = sum(v.matches("blue", "circle") for v in verdicts) / len(verdicts)
    iou = float(np.mean([v.iou for v in verdicts]))
    bg = float(np.mean([v.bg_error for v in verdicts])) * 255
    return ([f"blue circles {blue:.1%} < {min_blue:.0%}"] if blue < min_blue else []) + \
           ([f"mean IoU {iou:.3f} < {min_iou}"] if iou < min_iou else []) + \
           ([f"background {bg:.1f}/255 > {max_bg}"] if bg > max_bg else [])


# make test: one fine-tuning (seed 0), shared by the tests below


def test_red_to_blue_recolours_in_place_and_keeps_the_background(world):
    verdicts = edit_and_judge(world, "blue")
    assert blue_failures(verdicts) == [], [(v.colour, v.shape, round(v.iou, 2)) for v in verdicts]


def test_red_to_blue_keeps_the_shape_mask(world):
    verdicts = edit_and_judge(world, "blue")
    ok = [v for v in verdicts if v.matches("blue", "circle")]
    assert ok and np.mean([v.iou for v in ok]) >= 0.80, "0.58 with L1 alone, 0.70-0.77 with pixel edges, no refinement"


def test_the_red_to_blue_bounds_fail_for_the_untrained_model(world):
    """The check above can fail: the model before fine-tuning keeps its red circles (measured 0/32 blue)."""
    verdicts = judged(world, eps_fn_of(world["unet"]), SETTINGS["blue"]["t0"])
    assert sum(v.matches("red", "circle") for v in verdicts) >= 30  # the judge reads the originals right
    assert any(f.startswith("blue circles") for f in blue_failures(verdicts))


# make test-slow: the spread over fine-tuning seeds, and circle -> square


@pytest.mark.slow
@pytest.mark.parametrize("seed", ROBUSTNESS_SEEDS)
def test_red_to_blue_holds_at_other_fine_tuning_seeds(world, seed):
    """One fine-tuning each (~30 s on an idle 2-core machine; a test each, so that a loaded machine stays
    within the per-test timeout)."""
    failures = blue_failures(edit_and_judge(world, "blue", seed), min_blue=0.85, min_iou=0.78, max_bg=13.0)
    assert failures == [], failures


@pytest.mark.slow
@pytest.mark.timeout(3600)  # reuses the fine-tunings of the test above; run alone it does all four
def test_red_to_blue_meets_the_acceptance_over_seeds_pooled(world):
    per_seed = {s: edit_and_judge(world, "blue", s) for s in ROBUSTNESS_SEEDS}
    pooled = [v for vs in per_seed.values() for v in vs]
    assert blue_failures(pooled, min_blue=0.90, min_iou=0.82, max_bg=7.0) == [], {
        s: blue_failures(v, 1.0, 1.0, 0.0) for s, v in per_seed.items()}  # every value, for the record


@pytest.mark.slow
def test_circle_to_square_squares_most_circles_and_keeps_colour_and_background(world):
    verdicts = edit_and_judge(world, "square")
    ok = [v for v in verdicts if v.matches("red", "square")]
    assert len(ok) / len(verdicts) >= 0.80, [(v.colour, v.shape, round(v.fill_ratio, 2)) for v in verdicts]
    assert all(v.colour == "red" for v in verdicts), "the colour must be kept"
    assert np.mean([v.bg_error for v in verdicts]) * 255 <= 6.0
