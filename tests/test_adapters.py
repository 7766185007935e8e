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


def test_lora_finetuning_trains_saves_a_small_adapter_and_loads_on_its_base(base, tmp_path):
    """`--adapter lora` end to end at tiny size: only the adapter trains; the folder holds the adapter
    (a few % of the UNet) and the card; load_unet puts it on the card's base, as restyle/edit load it."""
    import os

    from dclip_ray.config import resolve_finetune_config
    from dclip_ray.diffusion import schedule_from_config
    from dclip_ray.edit import invert_images
    from dclip_ray.finetune import finetune, save_finetuned
    from dclip_ray.models import eps_fn_of, load_clip, load_schedule_config
    from dclip_ray.toyworld import sample_dataset

    samples = sample_dataset(2, seed=101, colours=["red"], shapes=["circle"])
    import numpy as np

    x0 = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    sched = schedule_from_config(load_schedule_config("toy_shapes"))
    cfg = resolve_finetune_config("red circle", "blue circle", {"recipe": "colour", "adapter": "lora", "lora_rank": 4,
                                                                "epochs": 1, "n_gen_steps": 2, "refine_from": 0})
    lat = invert_images(eps_fn_of(base), x0, cfg.t0, 8, sched)
    res = finetune(base, load_clip("toy_clip"), x0, lat, sched, cfg)
    frozen = {n: p for n, p in res.unet.named_parameters() if "lora_" not in n}
    base_params = dict(base.named_parameters())
    assert all(torch.equal(p, base_params[n.replace(".base_layer", "")]) for n, p in frozen.items()), "the base is frozen"
    out = save_finetuned(res, tmp_path / "ft", cfg, base, extra={"base_model": "toy_shapes"})
    files = {f: os.path.getsize(out / f) for f in os.listdir(out)}
    assert "adapter_model.safetensors" in files and "diffusion_pytorch_model.safetensors" not in files
    full = sum(p.numel() * 4 for p in base.parameters())
    assert files["adapter_model.safetensors"] < 0.2 * full
    loaded = load_unet(str(out))
    assert torch.allclose(_out(loaded), _out(res.unet), atol=1e-4), "the saved adapter is the trained one"
    assert not torch.allclose(_out(loaded), _out(base), atol=1e-4)


def test_edit_and_a_mix_run_over_adapter_folders(base, tmp_path):
    """`edit` (restyle on one machine) with a LoRA folder, and an eq. 14 mix of a LoRA folder and a full
    model: adapters load onto the base through load_unet, the base check reads the card."""
    import copy
    import json

    import yaml

    from dclip_ray.config import FinetuneConfig
    from dclip_ray.finetune import FinetuneResult, save_finetuned
    from dclip_ray.stages.edit import EditJob, run_edit
    from dclip_ray.toyworld.data import write_shards

    unet = add_lora(copy.deepcopy(base), rank=2)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    cfg = FinetuneConfig("red circle", "blue circle", t0=200, adapter="lora", lora_rank=2)
    lora = save_finetuned(FinetuneResult(unet, [], 0.0, 0), tmp_path / "lora", cfg, base,
                          extra={"base_model": "toy_shapes"})
    full = save_finetuned(FinetuneResult(copy.deepcopy(base), [], 0.0, 0), tmp_path / "full",
                          FinetuneConfig("red circle", "red square", t0=200), base, extra={"base_model": "toy_shapes"})
    data = str(tmp_path / "toy")
    write_shards(data, 4, seed=3, shard_size=4, colours=["red"], shapes=["circle"])
    from dclip_ray.config import RestyleSettings

    settings = RestyleSettings(n_inv_steps=4, n_gen_steps=4, batch_size=4)
    res = run_edit(EditJob(model="toy_shapes", finetuned=str(lora), images=data, out=str(tmp_path / "e1"),
                           settings=settings), progress=False)
    assert res["n_edited"] == 4
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"models": [str(lora), str(full)], "gamma": {"type": "constant", "weights": [0.5, 0.5]}}))
    res = run_edit(EditJob(model="toy_shapes", finetuned=None, mix=str(mix), images=data, out=str(tmp_path / "e2"),
                           settings=settings), progress=False)
    assert res["n_edited"] == 4
    assert json.loads((lora / "dclip.json").read_text())["format"] == "dclip-ray/lora-adapter/1"
