"""Fine-tuning loop mechanics on tiny random networks: modes, determinism, exact resumption, output format.

Whether an edit *works* is tested on the toy world (tests/test_finetune_toyworld.py); here the
question is whether the loop does what it promises.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from pipeline_fixtures import random_clip_weights

from dclip_ray.callbacks import Callback, StopTraining
from dclip_ray.diffusion import linear_schedule
from dclip_ray.errors import ConfigError
from dclip_ray.finetune import FinetuneConfig, finetune, save_finetuned
from dclip_ray.hashing import state_dict_sha256
from dclip_ray.losses import EditLoss
from dclip_ray.models import load_clip
from dclip_ray.toyworld import toy_clip_paths

SCHED = linear_schedule()


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    """The toy CLIP architecture with random weights (the method's quality is not under test here)."""
    return load_clip(toy_clip_paths()[0], weights=random_clip_weights(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    return x0, torch.randn(4, 3, 16, 16, generator=g)


def cfg(**kw):
    base = dict(source="red circle", target="blue circle", t0=300, n_gen_steps=3, epochs=2, batch_size=2,
                lr=1e-3, aug_views=2, seed=0)
    base.update(kw)
    return FinetuneConfig(**base)


class StopAfterBatches(Callback):
    """Ends the run after ``n`` batches (a kill, as far as the checkpoint folder can tell)."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def on_batch_end(self, state):
        self.seen += 1
        if self.seen >= self.n:
            raise StopTraining


class Recorder(Callback):
    """Records every hook call as (hook, step)."""

    def __init__(self):
        self.calls = []

    def on_train_begin(self, state):
        self.calls.append(("begin", state.step))

    def on_step_end(self, state, metrics):
        assert metrics is state.history[-1] and metrics["step"] == state.step - 1
        self.calls.append(("step", state.step))

    def on_batch_end(self, state):
        self.calls.append(("batch", state.step))

    def on_epoch_end(self, state):
        self.calls.append(("epoch", state.step))

    def on_checkpoint(self, path, metrics):
        self.calls.append(("checkpoint", int(metrics["step"]) + 1))

    def on_train_end(self, state):
        self.calls.append(("end", state.step))


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_efficient_mode_trains_a_copy_and_records_every_step(tiny_unet, random_clip, data):
    before = state_dict_sha256(tiny_unet)
    rec = Recorder()
    res = finetune(tiny_unet, random_clip, *data, SCHED, cfg(), callbacks=[rec])
    assert state_dict_sha256(tiny_unet) == before, "the base model must not change"
    assert len(res.history) == 2 * 2 * 3, "efficient mode: one optimiser step per generation step"
    assert [h["t"] for h in res.history[:3]] == [300, 150, 0]
    assert not weights_equal(res.unet, tiny_unet)
    assert res.final_loss == pytest.approx(sum(h["total"] for h in res.history[6:]) / 6)
    batch = [("step", 1), ("step", 2), ("step", 3), ("batch", 3)]
    shift = [[(k, s + d) for k, s in batch] for d in (0, 3, 6, 9)]
    assert rec.calls == [("begin", 0), *shift[0], *shift[1], ("epoch", 6), *shift[2], *shift[3], ("epoch", 12),
                         ("end", 12)], "hooks in order; no checkpoints without a checkpoint folder"


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tiny_unet, random_clip, data, tmp_path):
    ref = finetune(tiny_unet, random_clip, *data, SCHED, cfg(checkpoint_every=1))
    again = finetune(tiny_unet, random_clip, *data, SCHED, cfg(checkpoint_every=1))
    assert weights_equal(ref.unet, again.unet), "seeded CPU runs are deterministic"
    other = finetune(tiny_unet, random_clip, *data, SCHED, cfg(seed=1))
    assert not weights_equal(ref.unet, other.unet)
    # Killed after 3 of 4 batches (mid-epoch 2, last checkpoint after batch 3), then resumed.
    rec = Recorder()
    part = finetune(tiny_unet, random_clip, *data, SCHED, cfg(checkpoint_every=1), checkpoint_dir=tmp_path,
                    callbacks=[rec, StopAfterBatches(3)])
    assert len(part.history) == 9
    assert [c for c in rec.calls if c[0] in ("checkpoint", "batch", "epoch", "end")] == [
        ("checkpoint", 3), ("batch", 3), ("batch", 6), ("checkpoint", 6), ("epoch", 6), ("checkpoint", 9),
        ("batch", 9), ("end", 9)], "a checkpoint after every batch but an epoch's last (saved after its lr step)"
    resumed = finetune(tiny_unet, random_clip, *data, SCHED, cfg(checkpoint_every=1), checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 9
    assert weights_equal(ref.unet, resumed.unet)
    assert [h["total"] for h in resumed.history] == [h["total"] for h in ref.history]


def test_full_mode_and_gradient_checkpointing_agree(tiny_unet, random_clip, data):
    plain = finetune(tiny_unet, random_clip, *data, SCHED, cfg(mode="full", epochs=1))
    ckpt = finetune(tiny_unet, random_clip, *data, SCHED, cfg(mode="full", epochs=1, grad_checkpointing=True))
    assert len(plain.history) == 2, "full mode: one optimiser step per batch"
    assert all(h["t"] == -1 for h in plain.history)
    for (k, a), b in zip(plain.unet.state_dict().items(), ckpt.unet.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_identity_loss_keeps_its_gradient():
    class TinyFace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def embed(self, x):
            return torch.nn.functional.normalize(self.net(x), dim=-1)

    torch.manual_seed(0)
    loss_fn = EditLoss(clip=None, source="a", target="b", w_clip=0.0, w_id=1.0, face=TinyFace())
    x_gen = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss, parts = loss_fn(x_gen, torch.randn(2, 3, 16, 16))
    loss.backward()
    assert parts["id"] > 0 and x_gen.grad is not None and x_gen.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="face"):
        EditLoss(clip=None, source="a", target="b", w_id=1.0)


def test_saved_model_loads_without_dclip_ray(tiny_unet, random_clip, data, tmp_path):
    config = cfg(epochs=1)
    res = finetune(tiny_unet, random_clip, *data, SCHED, config)
    out = save_finetuned(res, tmp_path / "ft", config, tiny_unet, {"num_train_timesteps": 1000})
    loaded = UNet2DModel.from_pretrained(out)
    assert weights_equal(loaded, res.unet)
    card = json.loads((out / "dclip.json").read_text())
    assert card["base_model_sha256"] == state_dict_sha256(tiny_unet)
    assert card["target"] == "blue circle" and card["config"]["t0"] == 300
    assert (out / "diffusion_pytorch_model.safetensors").exists()


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="mode"):
        cfg(mode="fast")
    with pytest.raises(ConfigError, match="epochs"):
        cfg(epochs=0)


def test_augment_views_share_one_transform_and_blur_removes_fine_detail():
    from dclip_ray.losses import Augment, gaussian_blur

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    # a pair of equal images stays equal in every view: shift, blur and noise are shared
    for a, b in Augment(6, 3, 0.1, max_blur=1.5, flip="hv").views(x, x.clone(), torch.Generator().manual_seed(1)):
        assert torch.equal(a, b)
    # flips: with no shift/noise, every view is one of the 4 flips of x, and more than one occurs
    flips = {(0,): torch.flip(x, (-1,)), (1,): torch.flip(x, (-2,)), (0, 1): torch.flip(x, (-1, -2)), (): x}
    seen = set()
    for a, _ in Augment(16, 0, 0.0, flip="hv").views(x, x, torch.Generator().manual_seed(2)):
        seen |= {k for k, f in flips.items() if torch.equal(a, f)}
    assert len(seen) >= 3
    with pytest.raises(ConfigError, match="flip"):
        FinetuneConfig(source="a", target="b", aug_flip="v")
    # blur keeps a constant image and the mean, and removes most of a checkerboard's energy
    assert torch.allclose(gaussian_blur(torch.full((1, 3, 32, 32), 0.3), 1.0), torch.full((1, 3, 32, 32), 0.3))
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2).float().expand(1, 3, 32, 32) * 2 - 1
    blurred = gaussian_blur(checker, 1.0)
    assert blurred.abs().mean() < 0.05 * checker.abs().mean()


def discs(colour: str, smaller_by: float = 0.0) -> torch.Tensor:
    """8 toy discs [8,3,32,32] in [-1,1] in ``colour``, at the places and sizes of 8 held-out red circles
    (radius reduced by ``smaller_by`` pixels)."""
    import dataclasses

    import numpy as np

    from dclip_ray.toyworld import sample_dataset
    from dclip_ray.toyworld.render import render
    from dclip_ray.toyworld.train_ddpm import images_to_tensor

    held = sample_dataset(8, seed=202, colours=["red"], shapes=["circle"])
    return images_to_tensor(np.stack([
        render(colour, "circle", params=dataclasses.replace(s.params, r=s.params.r - smaller_by))[0] for s in held]))


def test_edge_loss_prefers_a_recolour_in_place_to_a_smaller_disc_where_l1_does_not():
    """Why the edge-structure loss exists: L1 to a red disc rewards a *smaller* blue disc (fewer pixels
    changed); edge magnitudes ignore the colour of an edge but not its place."""
    from dclip_ray.losses import edge_loss, l1_loss

    red, blue, smaller = discs("red"), discs("blue"), discs("blue", 2)
    assert l1_loss(smaller, red).mean() < 0.9 * l1_loss(blue, red).mean()  # the bias this loss corrects
    assert edge_loss(blue, red).mean() < 0.2 * edge_loss(smaller, red).mean()
    assert float(edge_loss(red, red).max()) < 1e-6
    x = blue.clone().requires_grad_(True)
    loss, parts = EditLoss(clip=None, source="a", target="b", w_clip=0.0, w_edge=1.0)(x, red)
    loss.backward()
    assert parts["edge"] > 0 and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=">= 0"):
        EditLoss(clip=None, source="a", target="b", w_edge=-1.0)


def test_multi_scale_edges_keep_pulling_a_disc_that_is_off_by_more_than_a_pixel_or_two():
    """At one scale the edge loss of a too-small disc peaks at 2 px and then falls (the outlines no
    longer overlap, and a smaller disc has fewer edge pixels); with 2x2 and 4x4 averages added it keeps
    growing, so a misplaced outline is pulled back from further away."""
    from dclip_ray.losses import edge_loss

    red = discs("red")

    def blue_smaller_by(d, scales):
        return float(edge_loss(discs("blue", d), red, scales).mean())

    one = [blue_smaller_by(d, 1) for d in (1, 2, 4)]
    three = [blue_smaller_by(d, 3) for d in (0, 1, 2, 4)]
    assert one[2] < one[1], one  # the single-scale loss gives up beyond 2 px
    assert three[0] < 0.2 * three[1] < three[1] < three[2] < three[3], three  # in place is cheap; monotone
    with pytest.raises(ConfigError, match="edge_scales=0: expected an integer >= 1"):
        cfg(edge_scales=0)


def test_contrast_matched_edges_charge_nothing_for_a_recolour_in_place_but_keep_a_rounded_square_costly():
    """edge_match=contrast: the absolute edge loss charges a recolour in place for the new colour's contrast
    with the background (toy blue -> yellow square: a quarter of what rounding the square into a disc
    costs); matched to the input's mean edge strength, the recolour costs ~nothing and the disc as much."""
    import numpy as np

    from dclip_ray.losses import edge_loss
    from dclip_ray.toyworld import sample_dataset
    from dclip_ray.toyworld.render import render
    from dclip_ray.toyworld.train_ddpm import images_to_tensor

    held = sample_dataset(8, seed=202, colours=["blue"], shapes=["square"])

    def as_(colour, shape):
        return images_to_tensor(np.stack([render(colour, shape, params=s.params)[0] for s in held]))

    blue, yellow, yellow_disc = as_("blue", "square"), as_("yellow", "square"), as_("yellow", "circle")
    absolute = [float(edge_loss(x, blue, 3).mean()) for x in (yellow, yellow_disc)]
    matched = [float(edge_loss(x, blue, 3, contrast=True).mean()) for x in (yellow, yellow_disc)]
    assert absolute[0] > 0.15 * absolute[1], absolute  # what the absolute form charges a recolour
    assert matched[0] < 0.02 * matched[1] and matched[1] > 0.8 * absolute[1], matched
    c = cfg(edge_match="contrast", w_edge=1.0)
    assert c.edit_loss(None).edge_contrast and not cfg(w_edge=1.0).edit_loss(None).edge_contrast
    with pytest.raises(ConfigError, match="edge_match"):
        cfg(edge_match="relative")


def test_refinement_stage_switches_the_loss_from_its_epoch(tiny_unet, random_clip, data):
    x0, lat = data
    staged = finetune(tiny_unet, random_clip, x0, lat, SCHED, cfg(epochs=3, w_l1=0.0, w_edge=1.0, refine_from=2,
                                                                  refine_l1=1.0, refine_edge_scales=2))
    by_epoch = {e: [h for h in staged.history if h["epoch"] == e] for e in range(3)}
    assert all("l1" not in h for e in (0, 1) for h in by_epoch[e])
    assert by_epoch[2] and all(h["l1"] > 0 for h in by_epoch[2])
    plain = finetune(tiny_unet, random_clip, x0, lat, SCHED, cfg(epochs=2, w_l1=0.0, w_edge=1.0))
    assert weights_equal(plain.unet, finetune(tiny_unet, random_clip, x0, lat, SCHED, cfg(
        epochs=2, w_l1=0.0, w_edge=1.0, refine_from=2, refine_l1=1.0)).unet)  # the stage starts after the last epoch
    assert cfg(refine_from=1, refine_l1=2.0).edit_loss(random_clip, epoch=1).w_l1 == 2.0
    assert cfg(refine_from=1, refine_l1=2.0).edit_loss(random_clip, epoch=0).w_l1 == 0.0


def test_the_frame_loss_charges_a_tinted_background_and_hardly_a_recolour_in_place():
    """frame=W: L1 charges a blue disc on a grey background about as much as the red disc recoloured
    in place plus a light blue tint of the background, which is how an edit meets the CLIP direction
    cheaply; on the outer frame only, the tint costs many times the recolour."""
    from dclip_ray.losses import frame_l1_loss, l1_loss

    red, blue = discs("red"), discs("blue")
    tint = torch.tensor([-0.06, -0.02, 0.08]).view(1, 3, 1, 1)
    grey = (red == red[:, :, :1, :1]).all(1, keepdim=True)  # pixels of the background's colour
    tinted = torch.where(grey, red + tint, blue)
    recolour = frame_l1_loss(blue, red).mean()
    assert frame_l1_loss(tinted, red).mean() > 5 * recolour
    assert l1_loss(tinted, red).mean() < 2 * l1_loss(blue, red).mean()  # plain L1 hardly tells them apart
    assert float(frame_l1_loss(red, red).max()) == 0.0
    x = tinted.clone().requires_grad_(True)
    loss, parts = EditLoss(clip=None, source="a", target="b", w_clip=0.0, w_frame=1.0)(x, red)
    loss.backward()
    assert parts["frame"] > 0 and x.grad[:, :, 16, 16].abs().sum() == 0 and x.grad[:, :, 0, 0].abs().sum() > 0
    assert cfg(w_frame=2.0).edit_loss(None).w_frame == 2.0
    with pytest.raises(ConfigError, match=">= 0"):
        cfg(w_frame=-1.0)


def shapes(colour: str, shape: str, grow: float = 0.0) -> torch.Tensor:
    """8 toy renders [8,3,32,32] in [-1,1] of ``colour`` ``shape`` at 8 fixed places and sizes (half-extent
    changed by ``grow`` pixels), the same places whatever the colour and shape."""
    from dclip_ray.toyworld.render import ShapeParams, render, sample_params

    rng = np.random.default_rng(3)
    ims = [render(colour, shape, params=ShapeParams(p.cx, p.cy, p.r + grow))[0]
           for p in (sample_params(rng) for _ in range(8))]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 127.5 - 1

def test_the_layout_loss_is_blind_to_a_recolour_in_place_and_charges_a_rounded_or_smaller_shape():
    """layout=W: on toy squares turned from red to blue, plain L1 charges the edit done right (blue
    squares) MORE than blue circles in the same place (the corners left grey are closer to red), which is
    how a recolour drifts into rounded shapes; the layout loss costs the recolour in place ~0 and the
    circles or 1-px-smaller squares hundreds of times more, and it has a gradient."""
    from dclip_ray.losses import l1_loss, layout_distances, layout_loss

    red = shapes("red", "square")
    blue, circles, smaller = shapes("blue", "square"), shapes("blue", "circle"), shapes("blue", "square", -1.0)
    assert l1_loss(circles, red).mean() < l1_loss(blue, red).mean()  # the trap the term is for
    recolour = layout_loss(blue, red).mean()
    assert recolour < 1e-3
    assert layout_loss(circles, red).mean() > 100 * recolour and layout_loss(smaller, red).mean() > 100 * recolour
    d = layout_distances(red)
    assert d.shape == (8, 1024, 1024) and torch.allclose(d.flatten(1).mean(1), torch.ones(8))
    blank = layout_distances(torch.zeros(2, 3, 64, 64))  # pooled to the 32 x 32 grid; one colour: no layout
    assert blank.shape == (2, 1024, 1024) and torch.equal(blank, torch.ones_like(blank))
    x = circles.clone().requires_grad_(True)
    loss, parts = EditLoss(clip=None, source="a", target="b", w_clip=0.0, w_layout=1.0)(x, red)
    loss.backward()
    assert parts["layout"] > 0 and x.grad.abs().sum() > 0
    assert cfg(w_layout=2.0).edit_loss(None).w_layout == 2.0
    with pytest.raises(ConfigError, match=">= 0"):
        cfg(w_layout=-1.0)


def test_the_palette_loss_lets_a_shape_grow_in_its_colour_and_charges_a_colour_drift_or_a_tint():
    """palette=W: green circles turned into green squares cost ~0 (every new pixel has a colour the input
    has) while the same squares in yellow, or the circles under a light tint, cost hundreds of times more;
    L1 charges the right edit too (the corners it adds), which is what pulls a shape edit back."""
    from dclip_ray.losses import l1_loss, palette_loss

    circles, squares, yellow = shapes("green", "circle"), shapes("green", "square"), shapes("yellow", "square")
    right = palette_loss(squares, circles).mean()
    assert right < 1e-3 and l1_loss(squares, circles).mean() > 0.02
    assert palette_loss(yellow, circles).mean() > 100 * right and palette_loss(circles + 0.06, circles).mean() > 50 * right
    assert palette_loss(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64)).shape == (2,)
    x = yellow.clone().requires_grad_(True)
    loss, parts = EditLoss(clip=None, source="a", target="b", w_clip=0.0, w_palette=1.0)(x, circles)
    loss.backward()
    assert parts["palette"] > 0 and x.grad.abs().sum() > 0
    assert cfg(w_palette=2.0).edit_loss(None).w_palette == 2.0
    with pytest.raises(ConfigError, match=">= 0"):
        cfg(w_palette=-1.0)
