"""Presets as data: the registry, its values, and `dclip-ray models list`."""

from __future__ import annotations

import pytest

from dclip_ray.cli import main
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.models import get_preset, list_presets
from dclip_ray.models.presets import PACKAGE_DIR, Preset, resolve_package_path

UNETS = {"celeba_hq", "lsun_church", "lsun_bedroom", "afhq_dog", "toy_shapes"}
CLIPS = {"clip_vit_b16", "clip_vit_b32", "toy_clip"}


def test_registry_lists_every_preset():
    assert set(list_presets()) == UNETS | CLIPS
    assert set(list_presets("unet")) == UNETS and set(list_presets("clip")) == CLIPS
    for name in list_presets():
        p = get_preset(name)
        assert isinstance(p, Preset) and p.name == name
        assert p.source.text
        if p.kind == "unet":
            assert p.schedule is not None and (p.schedule.T, p.schedule.beta_start, p.schedule.beta_end) == (1000, 1e-4, 0.02)
            assert p.resolution and p.t0 and p.loss_weights is not None
            assert p.recommended_clip in CLIPS
        if p.kind == "unet" and name != "toy_shapes":
            assert p.url and p.url.startswith("https://") and p.weights is None


def test_preset_values():
    celeba = get_preset("celeba_hq")
    assert celeba.face_loss and celeba.face_crop == "celeba_hq" and celeba.format == "ddim"
    cfg = celeba.unet_config()
    assert cfg["block_out_channels"] == [128, 128, 256, 256, 512, 512]
    assert cfg["down_block_types"][4] == "AttnDownBlock2D" and cfg["up_block_types"][1] == "AttnUpBlock2D"
    assert (cfg["norm_eps"], cfg["downsample_padding"], cfg["flip_sin_to_cos"], cfg["freq_shift"]) == (1e-6, 0, False, 1)
    dog = get_preset("afhq_dog")
    cfg = dog.unet_config()
    assert dog.format == "adm" and not dog.face_loss and cfg["out_channels"] == 6
    assert cfg["attention_head_dim"] == 64 and cfg["attn_norm_num_groups"] == 32
    assert cfg["resnet_time_scale_shift"] == "scale_shift" and cfg["layers_per_block"] == 1
    assert dog.schedule.to_scheduler_config()["variance_type"] == "learned_range"
    assert not get_preset("lsun_church").face_loss
    toy = get_preset("toy_shapes")
    assert (toy.format, toy.resolution, toy.t0) == ("diffusers", 32, 500) and toy.unet_config() is None
    assert toy.weights_path() == str(PACKAGE_DIR / "toyworld" / "weights" / "toy_unet")
    for name, arch in (("clip_vit_b16", "ViT-B-16-quickgelu"), ("clip_vit_b32", "ViT-B-32-quickgelu")):
        p = get_preset(name)
        assert p.architecture == {"model_name": arch, "quick_gelu": True}
    toy_clip = get_preset("toy_clip")
    assert resolve_package_path(toy_clip.architecture["config_dir"]) == str(PACKAGE_DIR / "toyworld" / "model_configs")
    assert (PACKAGE_DIR / "toyworld" / "model_configs" / "toy-clip-vit.json").is_file()


def test_unknown_and_file_presets(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*celeba_hq"):
        get_preset("nope")
    with pytest.raises(InputFileError):
        get_preset(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: vae\nsource: {text: t}\n")
    with pytest.raises(ConfigError, match="kind"):
        get_preset(str(bad))
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nkind: unet\nformat: ddim\narchitecture: {ch: 32, ch_mult: [1, 2]}\nresolution: 32\nsource: {text: mine}\n")
    cfg = get_preset(str(good)).unet_config()
    assert cfg["block_out_channels"] == [32, 64] and cfg["sample_size"] == 32


def test_models_list_cli(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in UNETS | CLIPS:
        assert name in out
    for where in ("celeba_hq.ckpt", "afhq_dog_4m.pt", "https://github.com/ermongroup/SDEdit",
                  "ViT-B-16-quickgelu", "google/ddpm-ema-church-256"):
        assert where in out


def test_toy_clip_preset_uses_the_templates_it_was_trained_with():
    from dclip_ray.toyworld.train_clip import TEMPLATES

    assert get_preset("toy_clip").architecture["templates"] == list(TEMPLATES)
