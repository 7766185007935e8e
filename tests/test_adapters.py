"""LoRA adapters (issue 22 item 1): injection, save/load, merge, on the toy UNet."""

from __future__ import annotations

import pytest
import torch

from dclip_ray.adapters import add_lora, apply_adapter, describe, is_adapter, lora_targets, save_adapter
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.models import load_unet


@pytest.fixture(scope="module")
def base():
    return load_unet("toy_shapes").eval()


def _out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 300])).sample


def test_targets_cover_the_chosen_groups(base):
    conv = lora_targets(base, ("conv",))
    attn = lora_targets(base, ("attention",))
    assert conv and all(n.endswith(("conv1", "conv2")) for n in conv)
    assert attn and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in attn)
    assert len(lora_targets(base)) == len(conv) + len(attn) + len(lora_targets(base, ("linear",)))
    with pytest.raises(ConfigError, match="unknown LoRA layer group"):
        lora_targets(base, ("mlp",))


def test_a_fresh_adapter_changes_nothing_and_trains_only_itself(base):
    import copy

    unet = add_lora(copy.deepcopy(base), rank=4)
    assert torch.equal(_out(unet), _out(base)), "B starts at zero"
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    d = describe(unet)
    assert d["rank"] == 4 and 0 < d["adapter_params"] < d["base_params"] / 10
    with pytest.raises(ConfigError, match="rank"):
        add_lora(copy.deepcopy(base), rank=0)


def test_save_load_and_merge_give_the_trained_output(base, tmp_path):
    import copy

    unet = add_lora(copy.deepcopy(base), rank=4)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    want = _out(unet)
    assert not torch.allclose(want, _out(base))
    save_adapter(unet, tmp_path / "a")
    assert is_adapter(tmp_path / "a") and not is_adapter(tmp_path)
    merged = apply_adapter(base, tmp_path / "a")
    unmerged = apply_adapter(base, tmp_path / "a", merge=False)
    assert torch.allclose(_out(unmerged), want, atol=1e-6)
    assert torch.allclose(_out(merged), want, atol=1e-4)
    assert torch.equal(_out(base), _out(load_unet("toy_shapes").eval())), "the base is not modified"
    (tmp_path / "b").mkdir()
    with pytest.raises(InputFileError, match="cannot read the adapter"):
        apply_adapter(base, tmp_path / "b")
