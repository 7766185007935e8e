"""LoRA adapters (issue 22 item 1): injection, save/load, merge, on the toy UNet."""

from __future__ import annotations

from pathlib import Path

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
        out = unet(x, torch.tensor([500, 300]))
    return out if isinstance(out, torch.Tensor) else out.sample


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


def _random_adapter(base, rank, seed, include=("conv", "attention", "linear"), std=0.02):
    import copy

    unet = add_lora(copy.deepcopy(base), rank=rank, include=include)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std, generator=torch.Generator().manual_seed(len(n) + 100 * seed))
    return unet


def _save_lora(base, unet, folder, rank, base_model="toy_shapes"):
    from dclip_ray.config import FinetuneConfig
    from dclip_ray.finetune import FinetuneResult, save_finetuned

    cfg = FinetuneConfig("red circle", "blue circle", t0=200, adapter="lora", lora_rank=rank)
    return save_finetuned(FinetuneResult(unet, [], 0.0, 0), folder, cfg, base, extra={"base_model": base_model})


def test_a_bank_switches_adapters_on_one_copy_exactly_as_merging_each(base, tmp_path):
    """AdapterBank: adapter i's output equals a merged copy of base + adapter i, in any switching order
    (each switch rewrites from the untouched base: no drift); None is the base; the base is untouched;
    K adapters add only their factors, not K UNets."""
    from dclip_ray.adapters import AdapterBank

    folders = []
    for k, (rank, include) in enumerate([(4, ("conv", "attention", "linear")), (2, ("attention",)), (8, ("conv",))]):
        save_adapter(_random_adapter(base, rank, k, include), tmp_path / f"a{k}")
        folders.append(tmp_path / f"a{k}")
    want = [_out(apply_adapter(base, f)) for f in folders]
    ref = _out(base)
    bank = AdapterBank(base)
    assert [bank.add(f) for f in folders] == [0, 1, 2]
    for i in [0, 2, 1, 0, 1, 2, 2]:
        got = _out(lambda x, t, i=i: bank.eps_fn(i)(x, t))
        assert torch.allclose(got, want[i], atol=1e-5), f"adapter {i} after switching"
        assert not torch.allclose(got, ref, atol=1e-4)
    assert bank.switches == 6, "a repeated adapter is not rewritten"
    assert torch.equal(_out(lambda x, t: bank.eps_fn(None)(x, t)), ref)
    assert torch.equal(ref, _out(load_unet("toy_shapes").eval())), "the base is not modified"
    factors = sum(a.numel() + b.numel() for f in bank._factors for a, b, _ in f.values())
    assert factors < 0.5 * sum(p.numel() for p in base.parameters())
    other = load_unet("toy_shapes").eval()
    with torch.no_grad():
        other.conv_in.weight.zero_()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text('{"rank": 1, "alpha": 1, "include": ["conv"]}')
    from safetensors.torch import save_file

    save_file({"nope.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "empty" / "adapter_model.safetensors"))
    with pytest.raises(InputFileError, match="does not fit this base UNet"):
        bank.add(tmp_path / "empty")


def test_restyle_on_ray_with_two_adapters_and_a_mix_equals_their_merged_full_models(base, tmp_path, ray_local):
    """Restyle (Ray actors) over two LoRA folders and an eq. 14 mix of them writes, image for image, what
    the same run over full folders holding the merged weights writes; the adapters load onto the run's
    own --model whatever path their card names; an adapter of another base is refused before any work."""
    import io
    import json
    import tarfile

    import numpy as np
    from PIL import Image

    from dclip_ray.config import FinetuneConfig
    from dclip_ray.errors import ConfigError
    from dclip_ray.finetune import FinetuneResult, save_finetuned
    from dclip_ray.pipeline.restyle import RestyleJob, run_restyle
    from dclip_ray.stages.restyle_config import build_restyle_config
    from dclip_ray.toyworld.data import write_shards

    data = str(tmp_path / "toy")
    write_shards(data, 8, seed=5, shard_size=4, colours=["red"], shapes=["circle", "square"])
    loras, fulls = [], []
    for k in range(2):
        unet = _random_adapter(base, 4, k, std=0.1)
        # a card naming a base path that does not exist from here: the run's own base is used
        loras.append(str(_save_lora(base, unet, tmp_path / f"lora{k}", 4, base_model="gone/relative/base")))
        merged = apply_adapter(base, tmp_path / f"lora{k}")
        fulls.append(str(save_finetuned(FinetuneResult(_unwrap(merged, base), [], 0.0, 0), tmp_path / f"full{k}",
                                        FinetuneConfig("red circle", "blue circle", t0=200), base,
                                        extra={"base_model": "toy_shapes"})))

    def images(out):
        got = {}
        for tar in sorted(Path(out).rglob("*.tar")):
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    if m.name.endswith(".png"):
                        rel = f"{tar.parent.name.replace('lora', 'm').replace('full', 'm')}/{m.name}"
                        got[rel] = np.asarray(Image.open(io.BytesIO(t.extractfile(m).read())), dtype=np.int16)
        return got

    runs = {}
    for kind, models in (("lora", loras), ("full", fulls)):
        out = str(tmp_path / f"out_{kind}")
        cfg = build_restyle_config(out, models=models, base="toy_shapes", t0=200, n_inv_steps=4, n_gen_steps=4,
                                   batch_size=4)
        s = run_restyle(RestyleJob(cfg, data, actors=2), progress=False)
        assert s["n_images"] == 8 and not s.get("errors"), s
        mix = {"models": models, "gamma": {"type": "constant", "weights": [0.5, 0.5]}}
        cfg = build_restyle_config(out + "_mix", mix=mix, base="toy_shapes", t0=200, n_inv_steps=4, n_gen_steps=4,
                                   batch_size=4)
        run_restyle(RestyleJob(cfg, data, actors=1), progress=False)
        runs[kind] = {**images(out), **{f"mix/{k}": v for k, v in images(out + "_mix").items()}}
    assert len(runs["lora"]) == 3 * 8 and runs["lora"].keys() == runs["full"].keys()
    worst = max(int(np.abs(runs["lora"][k] - runs["full"][k]).max()) for k in runs["lora"])
    assert worst <= 1, f"LoRA outputs differ from the merged full models' by {worst}/255"
    a = {k.split("/", 1)[1]: v for k, v in runs["lora"].items() if k.startswith("m0/")}
    b = {k.split("/", 1)[1]: v for k, v in runs["lora"].items() if k.startswith("m1/")}
    assert a.keys() == b.keys() and np.mean([np.abs(a[k] - b[k]).mean() for k in a]) > 2, "the adapters differ"
    card = json.loads((Path(loras[0]) / "dclip.json").read_text())
    card["base_model_sha256"] = "0" * 64
    (Path(loras[0]) / "dclip.json").write_text(json.dumps(card))
    cfg = build_restyle_config(str(tmp_path / "o3"), models=loras[:1], base="toy_shapes", t0=200, n_inv_steps=4,
                               n_gen_steps=4)
    with pytest.raises(ConfigError, match="LoRA adapter of another base model"):
        run_restyle(RestyleJob(cfg, data, actors=1), progress=False)
    assert not (tmp_path / "o3").exists() or not list((tmp_path / "o3").rglob("*.tar"))


def _unwrap(merged, base):
    """A plain UNet holding ``merged``'s (merged) weights."""
    import copy

    plain = copy.deepcopy(base)
    sd = {k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(sd)
    return plain
