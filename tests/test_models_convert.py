"""Conversion proven against independent implementations of the original architectures.

Each test builds the original network (tests/reference_arch, random seeded weights), converts its
state dict, loads it strictly into diffusers ``UNet2DModel`` and compares eps in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel
from reference_arch import randomize_
from reference_arch.adm import ADMUNet
from reference_arch.ddpm import DDPMModel

from dclip_ray.cli import main
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.models import (
    adm_unet_config,
    convert_adm_state_dict,
    convert_checkpoint,
    convert_ddim_state_dict,
    ddpm_unet_config,
    eps_fn_of,
    get_preset,
    load_schedule_config,
    load_unet,
)

TOL = 1e-4
TS = [0, 1, 250, 500, 999]

DDPM_TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), resolution=16)
ADM_TINY = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2,),
                num_head_channels=16, learn_sigma=True)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _max_eps_diff(ref: torch.nn.Module, unet: UNet2DModel, res: int, batch: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for t in TS:
            x = torch.randn(batch, 3, res, res, generator=g)
            tt = torch.full((batch,), t, dtype=torch.long)
            if batch > 1:  # different t within one batch too
                tt = torch.tensor([TS[(TS.index(t) + i) % len(TS)] for i in range(batch)])
            a, b = ref(x, tt), unet(x, tt).sample
            assert a.shape == b.shape
            worst = max(worst, (a - b).abs().max().item())
    return worst


def _ddpm(seed: int = 1, **kw) -> tuple[DDPMModel, dict]:
    args = {**DDPM_TINY, **kw}
    ref = randomize_(DDPMModel(**args), seed)
    cfg = ddpm_unet_config(args["ch"], args["ch_mult"], args["num_res_blocks"], args["attn_resolutions"], args["resolution"])
    return ref, cfg


def _adm(seed: int = 2, res: int = 16, **kw) -> tuple[ADMUNet, dict]:
    args = {**ADM_TINY, **kw}
    ref = randomize_(ADMUNet(**args), seed)
    cfg = adm_unet_config(args["model_channels"], args["channel_mult"], args["num_res_blocks"],
                          args["attention_resolutions"], args["num_head_channels"], res, learn_sigma=args["learn_sigma"])
    return ref, cfg


def _strict(cfg: dict, sd: dict) -> UNet2DModel:
    unet = UNet2DModel.from_config(cfg).eval()
    unet.load_state_dict(sd, strict=True)
    return unet


@pytest.mark.parametrize("batch", [1, 3])
def test_ddim_format_parity(batch):
    ref, cfg = _ddpm()
    unet = _strict(cfg, convert_ddim_state_dict(ref.state_dict(), cfg))
    assert _max_eps_diff(ref, unet, 16, batch) < TOL


def test_ddim_parity_one_res_block_32px_two_attention_levels():
    ref, cfg = _ddpm(seed=3, num_res_blocks=1, attn_resolutions=(16, 8), resolution=32)
    unet = _strict(cfg, convert_ddim_state_dict(ref.state_dict(), cfg))
    assert _max_eps_diff(ref, unet, 32, 2) < TOL


def test_ddim_default_diffusers_config_is_wrong():
    """The config traps are real: diffusers' defaults load the same weights without error but
    give different outputs (so the parity test above can fail)."""
    ref, cfg = _ddpm()
    sd = convert_ddim_state_dict(ref.state_dict(), cfg)
    bad = {**cfg, "flip_sin_to_cos": True, "freq_shift": 0}
    assert _max_eps_diff(ref, _strict(bad, sd), 16, 1) > 1e-2
    bad = {**cfg, "downsample_padding": 1}
    assert _max_eps_diff(ref, _strict(bad, sd), 16, 1) > 1e-2


@pytest.mark.parametrize("batch", [1, 3])
def test_adm_parity_multihead_learned_sigma(batch):
    ref, cfg = _adm()
    assert cfg["out_channels"] == 6
    unet = _strict(cfg, convert_adm_state_dict(ref.state_dict(), cfg))
    assert ref.input_blocks[3][1].heads == 4  # attention level: 64 channels / 16 = 4 heads
    assert _max_eps_diff(ref, unet, 16, batch) < TOL
    # eps_fn: the first 3 of the 6 channels
    x = torch.randn(batch, 3, 16, 16)
    t = torch.full((batch,), 123, dtype=torch.long)
    with torch.no_grad():
        eps = eps_fn_of(unet)(x, t)
        assert eps.shape == (batch, 3, 16, 16)
        assert (eps - ref(x, t)[:, :3]).abs().max().item() < TOL


def test_adm_parity_two_res_blocks_32px():
    ref, cfg = _adm(seed=5, res=32, num_res_blocks=2, attention_resolutions=(2, 4), num_head_channels=32,
                    learn_sigma=False)
    unet = _strict(cfg, convert_adm_state_dict(ref.state_dict(), cfg))
    assert _max_eps_diff(ref, unet, 32, 2) < TOL


def test_adm_qkv_plain_chunk_is_wrong_for_several_heads():
    """The qkv layout trap: splitting the fused qkv in three equal chunks (right for one head
    only) gives a model that loads but computes something else."""
    ref, cfg = _adm()
    sd = convert_adm_state_dict(ref.state_dict(), cfg)
    wrong = dict(sd)
    src = ref.state_dict()
    # re-do the attention split naively for the down-block attention
    w = src["input_blocks.3.1.qkv.weight"][..., 0]
    b = src["input_blocks.3.1.qkv.bias"]
    for name, part_w, part_b in zip("qkv", w.chunk(3, dim=0), b.chunk(3, dim=0), strict=True):
        wrong[f"down_blocks.1.attentions.0.to_{name}.weight"] = part_w
        wrong[f"down_blocks.1.attentions.0.to_{name}.bias"] = part_b
    assert _max_eps_diff(ref, _strict(cfg, wrong), 16, 1) > 1e-2


def test_adm_mid_attention_needs_attn_norm_groups():
    ref, cfg = _adm()
    bad = {k: v for k, v in cfg.items() if k != "attn_norm_num_groups"}
    unet = UNet2DModel.from_config(bad).eval()
    result = unet.load_state_dict(convert_adm_state_dict(ref.state_dict(), cfg), strict=False)
    assert "mid_block.attentions.0.group_norm.weight" in result.unexpected_keys


def test_full_celeba_hq_strict_load_and_param_count():
    ref = DDPMModel()  # the full ddim-repo Model: ch 128, ch_mult (1,1,2,2,4,4), attention at 16
    n_ref = sum(p.numel() for p in ref.parameters())
    cfg = get_preset("celeba_hq").unet_config()
    unet = UNet2DModel.from_config(cfg)
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n - 113.7e6) < 0.1e6 and n == n_ref
    unet.load_state_dict(convert_ddim_state_dict(ref.state_dict(), cfg), strict=True)


def test_full_afhq_adm_strict_load():
    ref = ADMUNet()  # ILVR's AFHQ-dog config
    cfg = get_preset("afhq_dog").unet_config()
    unet = UNet2DModel.from_config(cfg)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in unet.parameters()) == n_ref
    assert abs(n_ref - 93.8e6) < 0.5e6, n_ref
    sd = convert_adm_state_dict(ref.state_dict(), cfg)
    unet.load_state_dict(sd, strict=True)
    assert unet.mid_block.attentions[0].heads == 8  # 512 channels / 64-channel heads


# ---- loading and the convert command end to end -------------------------------------------

def _write_preset(tmp_path, name, fmt, arch, res, variance="fixed_small"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nkind: unet\nformat: {fmt}\narchitecture: {json.dumps(arch)}\n"
        f"schedule: {{T: 1000, beta_start: 0.0001, beta_end: 0.02, variance_type: {variance}}}\n"
        f"resolution: {res}\nt0: 400\nsource: {{text: made by the test}}\n"
    )
    return str(path)


@pytest.fixture
def tiny_ckpts(tmp_path):
    ddpm, _ = _ddpm()
    ddim_ckpt = tmp_path / "tiny_ddim.ckpt"
    torch.save(ddpm.state_dict(), ddim_ckpt)
    ddim_preset = _write_preset(tmp_path, "tiny_ddpm", "ddim",
                                {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [8]}, 16)
    adm, _ = _adm()
    adm_pt = tmp_path / "tiny_adm.pt"
    torch.save(adm.state_dict(), adm_pt)
    adm_preset = _write_preset(tmp_path, "tiny_adm", "adm",
                               {"model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                                "attention_resolutions": [2], "num_head_channels": 16, "learn_sigma": True},
                               16, "learned_range")
    return {"ddim": (ddpm, str(ddim_ckpt), ddim_preset), "adm": (adm, str(adm_pt), adm_preset)}


@pytest.mark.parametrize("fmt", ["ddim", "adm"])
def test_load_unet_from_checkpoint_file(tiny_ckpts, fmt):
    ref, path, preset = tiny_ckpts[fmt]
    unet = load_unet(path, preset=preset)
    assert not unet.training
    assert _max_eps_diff(ref, unet, 16, 2) < TOL


@pytest.mark.parametrize("fmt", ["ddim", "adm"])
def test_convert_cli_end_to_end(tiny_ckpts, tmp_path, fmt, capsys):
    ref, path, preset = tiny_ckpts[fmt]
    out = tmp_path / f"out_{fmt}"
    assert main(["convert", path, "--preset", preset, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    plain = UNet2DModel.from_pretrained(str(out)).eval()  # diffusers alone, no dclip-ray
    assert _max_eps_diff(ref, plain, 16, 3) < TOL
    sched = json.loads((out / "scheduler_config.json").read_text())
    assert sched["num_train_timesteps"] == 1000 and sched["beta_end"] == 0.02
    assert sched["variance_type"] == ("learned_range" if fmt == "adm" else "fixed_small")
    # the converted folder loads through load_unet and gives its schedule
    assert load_schedule_config(str(out)) == sched
    assert _max_eps_diff(ref, load_unet(str(out)), 16, 1) < TOL


def test_convert_safetensors_state_dict_and_fsspec_url(tiny_ckpts, tmp_path):
    from safetensors.torch import save_file

    ref, _, preset = tiny_ckpts["ddim"]
    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    folder = convert_checkpoint(str(st), preset, str(tmp_path / "conv"))
    assert _max_eps_diff(ref, load_unet("file://" + folder), 16, 1) < TOL
    # a pipeline snapshot layout: unet/ + scheduler/ subfolders, read through an fsspec URL
    import fsspec

    mem = fsspec.filesystem("memory")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        mem.pipe(f"/snap/unet/{name}", (tmp_path / "conv" / name).read_bytes())
    mem.pipe("/snap/scheduler/scheduler_config.json", (tmp_path / "conv" / "scheduler_config.json").read_bytes())
    assert _max_eps_diff(ref, load_unet("memory://snap"), 16, 1) < TOL
    assert load_schedule_config("memory://snap")["beta_start"] == 1e-4
    assert load_schedule_config("memory://snap/unet")["beta_start"] == 1e-4
    # a single checkpoint file behind a URL
    mem.pipe("/ckpts/tiny.safetensors", st.read_bytes())
    assert _max_eps_diff(ref, load_unet("memory://ckpts/tiny.safetensors", preset), 16, 1) < TOL


def test_ddim_training_state_list_with_module_prefix(tmp_path, tiny_ckpts):
    """The ddim repo's own checkpoints: [model, optimizer, epoch, step, ema], DataParallel keys."""
    ref, _, preset = tiny_ckpts["ddim"]
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    junk = {"module." + k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save([junk, {"state": {}, "param_groups": []}, 3, 1000, sd], path)
    assert _max_eps_diff(ref, load_unet(str(path), preset), 16, 1) < TOL


def test_untrusted_pickle_needs_flag(tmp_path, tiny_ckpts):
    import argparse

    ref, _, preset = tiny_ckpts["ddim"]
    path = tmp_path / "pickled.ckpt"  # training scripts often pickle their argparse args beside the weights
    torch.save({"state_dict": ref.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(InputFileError, match="--trust-checkpoint"):
        load_unet(str(path), preset)
    assert _max_eps_diff(ref, load_unet(str(path), preset, trust_checkpoint=True), 16, 1) < TOL


def test_preset_schedule_and_raw_needs_preset(tiny_ckpts):
    assert load_schedule_config("celeba_hq")["beta_schedule"] == "linear"
    _, path, preset = tiny_ckpts["adm"]
    assert load_schedule_config(path, preset)["variance_type"] == "learned_range"
    assert load_schedule_config(path) is None
    with pytest.raises(ConfigError, match="--preset"):
        load_unet(path)


def _cli_error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_convert_cli_bad_inputs(tiny_ckpts, tmp_path, capsys):
    _, ddim_path, ddim_preset = tiny_ckpts["ddim"]
    _, adm_path, adm_preset = tiny_ckpts["adm"]
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    other = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, other)
    cases = [
        (["convert", str(tmp_path / "missing.ckpt"), "--preset", "celeba_hq", "--out", str(tmp_path / "o1")], "no such file"),
        (["convert", str(text), "--preset", "celeba_hq", "--out", str(tmp_path / "o2")], "not a PyTorch checkpoint"),
        (["convert", str(other), "--preset", "celeba_hq", "--out", str(tmp_path / "o3")], "unrecognised checkpoint"),
        (["convert", ddim_path, "--preset", "celeba_hq", "--out", str(tmp_path / "o4")], "does not fit preset celeba_hq"),
        (["convert", adm_path, "--preset", ddim_preset, "--out", str(tmp_path / "o5")], "expects ddim"),
        (["convert", adm_path, "--preset", "afhq_dog", "--out", str(tmp_path / "o6")], "does not fit preset afhq_dog"),
        (["convert", ddim_path, "--preset", "nonesuch", "--out", str(tmp_path / "o7")], "unknown preset"),
        (["convert", "memory://nowhere/model", "--preset", "celeba_hq", "--out", str(tmp_path / "o8")], "cannot read memory://nowhere/model"),
        (["convert", "nosuchproto://bucket/x.ckpt", "--preset", "celeba_hq", "--out", str(tmp_path / "o9")], "cannot read nosuchproto://"),
        (["convert", str(tmp_path), "--out", str(tmp_path / "o10")], "no config.json"),
    ]
    for argv, expected in cases:
        rc, err = _cli_error(capsys, argv)
        assert rc == 1, (argv, err)
        assert err.startswith("error: ") and "\n" not in err, err
        assert expected in err, (expected, err)
    for i in range(1, 11):
        assert not (tmp_path / f"o{i}").exists()
    # a non-empty output folder is refused before any work
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    rc, err = _cli_error(capsys, ["convert", ddim_path, "--preset", ddim_preset, "--out", str(tmp_path / "full")])
    assert rc == 1 and "not empty" in err


def test_toy_preset_weights_missing_is_one_line(monkeypatch, tmp_path):
    from dclip_ray.models import presets

    p = get_preset("toy_shapes")
    assert p.weights_path().endswith("dclip_ray/toyworld/weights/toy_unet")
    monkeypatch.setattr(presets, "PACKAGE_DIR", tmp_path)  # as if the weights were not built yet
    with pytest.raises(InputFileError, match="not there yet") as e:
        load_unet("toy_shapes")
    assert "\n" not in str(e.value)


def test_toy_preset_loads_bundled_folder(monkeypatch, tmp_path, tiny_ckpts):
    """Once the toy world's weights exist at the package path, the preset name is enough."""
    from dclip_ray.models import presets

    ref, path, preset = tiny_ckpts["ddim"]
    convert_checkpoint(path, preset, str(tmp_path / "toyworld" / "weights" / "toy_unet"))
    cfg_path = tmp_path / "toyworld" / "weights" / "toy_unet" / "scheduler_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"DDPMScheduler"', '"DDIMScheduler"'))
    monkeypatch.setattr(presets, "PACKAGE_DIR", tmp_path)
    assert _max_eps_diff(ref, load_unet("toy_shapes"), 16, 1) < TOL
    assert load_schedule_config("toy_shapes")["_class_name"] == "DDIMScheduler"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["celeba_hq", "afhq_dog"])
def test_full_size_parity_256(arch):
    """Parity at the real 256x256 configurations (random weights), one batch of 2."""
    ref = randomize_(DDPMModel() if arch == "celeba_hq" else ADMUNet(), seed=7)
    cfg = get_preset(arch).unet_config()
    convert = convert_ddim_state_dict if arch == "celeba_hq" else convert_adm_state_dict
    unet = _strict(cfg, convert(ref.state_dict(), cfg))
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 600])
    with torch.no_grad():
        assert (ref(x, t) - unet(x, t).sample).abs().max().item() < TOL
