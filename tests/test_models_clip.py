"""CLIP loading and encoding on a tiny open_clip architecture at random weights (no downloads)."""

from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.models import IMAGENET_TEMPLATES, ClipEnsemble, load_clip, preprocess_for_clip
from dclip_ray.models import clip as clip_module
from dclip_ray.models.clip import OPENAI_MEAN, OPENAI_STD

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
NAME = "dclip-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clipcfg")
    (d / f"{NAME}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(d))
    return str(d)


@pytest.fixture(scope="module")
def tiny_weights(tiny_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, pretrained=None)
    path = tmp_path_factory.mktemp("clipw") / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path), model.eval()


@pytest.fixture
def clip(tiny_weights):
    return load_clip(NAME, tiny_weights[0])


def _reference_preprocess(x, size):
    y = TF.resize((x + 1) / 2, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    y = TF.center_crop(y, [size, size])
    return TF.normalize(y, OPENAI_MEAN, OPENAI_STD)


@pytest.mark.parametrize("shape", [(2, 3, 48, 64), (1, 3, 70, 40), (2, 3, 32, 32), (1, 3, 20, 20)])
def test_preprocess_matches_torchvision(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = preprocess_for_clip(x, 32)
    ref = _reference_preprocess(x, 32)
    assert ours.shape == (shape[0], 3, 32, 32)
    assert (ours - ref).abs().max().item() < 1e-5


def test_loaded_weights_match_and_model_is_frozen(clip, tiny_weights):
    _, original = tiny_weights
    assert not clip.model.training
    assert all(not p.requires_grad for p in clip.model.parameters())
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        expected = original.encode_image(_reference_preprocess(x, 32))
    expected = expected / expected.norm(dim=-1, keepdim=True)
    emb = clip.encode_image(x)
    assert emb.shape == (2, 32)
    assert (emb - expected).abs().max().item() < 1e-5
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    txt = clip.encode_text(["a red circle", "a blue square", "x"])
    assert txt.shape == (3, 32) and torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_gradient_reaches_input_only(clip):
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    direction = clip.text_direction("circle", "square")
    loss = 1 - (clip.encode_image(x) @ direction).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())


def test_text_direction_official_form_unit_norm_and_cached(clip, monkeypatch):
    assert len(IMAGENET_TEMPLATES) == 79 and all("{}" in t for t in IMAGENET_TEMPLATES)
    templates = IMAGENET_TEMPLATES[:5]
    calls = []
    real = clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda texts: calls.append(list(texts)) or real(texts))
    d = clip.text_direction("photo", "sketch", templates)
    assert abs(d.norm().item() - 1) < 1e-5
    # the official computation, written out
    src = real([t.format("photo") for t in templates])
    tgt = real([t.format("sketch") for t in templates])
    expected = (tgt - src).mean(0)
    expected = expected / expected.norm()
    assert (d - expected).abs().max().item() < 1e-6
    n = len(calls)
    assert n == 2
    d2 = clip.text_direction("photo", "sketch", templates)
    assert d2 is d and len(calls) == n  # cached: no new text encoding
    e = clip.text_embedding("photo", templates)
    assert len(calls) == n  # the per-template features were cached too
    assert abs(e.norm().item() - 1) < 1e-5
    assert (e - src.mean(0) / src.mean(0).norm()).abs().max().item() < 1e-6


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_quick_gelu_trap(tiny_weights, tmp_path, monkeypatch):
    from open_clip.transformer import QuickGELU

    path, original = tiny_weights
    assert not load_clip(NAME, path).quick_gelu
    assert load_clip(NAME, path, quick_gelu=True).quick_gelu
    # a state dict whose path says it holds OpenAI's weights (e.g. the hub's *.openai snapshots)
    openai_sd = tmp_path / "vit_clip_224.openai" / "open_clip_pytorch_model.bin"
    openai_sd.parent.mkdir()
    torch.save(original.state_dict(), openai_sd)
    assert load_clip(NAME, str(openai_sd)).quick_gelu
    assert not load_clip(NAME, str(openai_sd), quick_gelu=False).quick_gelu
    # OpenAI's release format is a TorchScript archive: QuickGELU is switched on by itself
    scripted_path = tmp_path / "openai_like.pt"
    torch.jit.save(_scripted_clip(original), scripted_path)
    with pytest.raises(InputFileError, match="--trust-checkpoint"):
        load_clip(NAME, str(scripted_path))  # TorchScript holds code: refused unless trusted
    m = load_clip(NAME, str(scripted_path), trust_checkpoint=True)
    assert m.quick_gelu and any(isinstance(x, QuickGELU) for x in m.model.modules())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(m.model.visual.conv1.weight, original.visual.conv1.weight)
    assert m.encode_image(x).shape == (1, 32)
    # the OpenAI presets name the -quickgelu architectures (the architecture only: its weights are not read)
    monkeypatch.setattr(clip_module, "_load_weights", lambda *args: None)
    stand_in = tmp_path / "ViT-B-32.safetensors"
    stand_in.write_bytes(b"")
    big = load_clip("clip_vit_b32", str(stand_in))
    assert big.quick_gelu and big.image_size == 224
    assert big.mean == pytest.approx(OPENAI_MEAN) and big.std == pytest.approx(OPENAI_STD)
    assert load_clip("ViT-B/32", str(stand_in)).quick_gelu  # OpenAI's own model name


def _scripted_clip(model):
    """A TorchScript archive holding ``model``'s parameters under their own names (the layout of
    OpenAI's released .pt files), plus OpenAI's extra integer attributes."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in model.named_children():
                self.add_module(name, child)
            for name, p in model.named_parameters(recurse=False):
                self.register_parameter(name, torch.nn.Parameter(p.detach().clone()))
            for name, b in model.named_buffers(recurse=False):
                self.register_buffer(name, b.clone())
            self.register_buffer("input_resolution", torch.tensor(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(Holder(), torch.zeros(1), check_trace=False)


def test_ensemble_and_errors(clip, tiny_weights):
    ens = ClipEnsemble([clip, clip], [3.0, 1.0])
    assert [w for _, w in ens.members] == [0.75, 0.25] and len(ens) == 2
    with pytest.raises(ConfigError):
        ClipEnsemble([clip], [1.0, 2.0])
    with pytest.raises(ConfigError):
        ClipEnsemble([clip], [-1.0])
    with pytest.raises(ConfigError, match="needs a weights file"):
        load_clip("clip_vit_b16")
    with pytest.raises(ConfigError, match="unknown CLIP model"):
        load_clip("no-such-model", tiny_weights[0])
    with pytest.raises(InputFileError, match="no such file"):
        load_clip(NAME, "/nonexistent/w.safetensors")
    with pytest.raises(ConfigError, match="unet preset"):
        load_clip("celeba_hq")


def test_wrong_weights_file_is_one_line(tmp_path, tiny_dir):
    path = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(InputFileError, match="do not load") as e:
        load_clip(NAME, str(path))
    assert "\n" not in str(e.value)


def test_toy_clip_preset_missing_weights(monkeypatch, tmp_path):
    from dclip_ray.models import get_preset, presets

    p = get_preset("toy_clip")
    assert p.kind == "clip" and p.architecture["model_name"] == "toy-clip-vit"
    assert p.weights_path().endswith("dclip_ray/toyworld/weights/toy_clip.safetensors")
    monkeypatch.setattr(presets, "PACKAGE_DIR", tmp_path)
    with pytest.raises(InputFileError, match="not there yet"):
        load_clip("toy_clip")
