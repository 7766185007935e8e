"""The pipeline's units of work without Ray: precompute and restyle one shard, exactly once, verify.

Tiny random UNets stand in for the models (the method's quality is tested on the toy world elsewhere);
what is checked here is bookkeeping: every key exactly once, reasons for bad inputs, one inversion per
image whatever the number of models, no stale latents, idempotent re-runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile

import pytest
import torch
from pipeline_fixtures import BAD_REASONS, make_world, random_clip_weights

from dclip_ray.errors import ConfigError
from dclip_ray.io.latents import LatentKey, LatentStore
from dclip_ray.io.manifest import ManifestRow, read_manifest, write_manifest
from dclip_ray.models.cache import cached_base
from dclip_ray.stages.inputs import input_shards
from dclip_ray.stages.precompute import precompute_shard
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import build_restyle_config, restyle_plan
from dclip_ray.stages.training_data import training_data
from dclip_ray.stages.verify import verify

T0, N_INV, N_GEN = 200, 4, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), T0)


def files_state(folder):
    return {p: (os.stat(os.path.join(folder, p)).st_mtime_ns, hashlib.sha256(open(os.path.join(folder, p), "rb").read()).hexdigest())
            for p in sorted(os.listdir(folder))}


def restyle_all(cfg, data):
    r = ShardRestyler(cfg)
    return [r.run(n, p) for n, p in input_shards(data)]


def test_precompute_shard_reasons_counts_and_skip(world, tmp_path):
    base = cached_base(world["base"])
    key = LatentKey(base.sha256, T0, N_INV, 32)
    shards = dict(input_shards(world["data"]))
    s = precompute_shard(world["base"], None, "bad", shards["bad"], str(tmp_path), key, batch_size=4, recon_psnr=True)
    assert (s["n"], s["n_ok"], s["n_error"]) == (6, 2, 4)
    for k, reason in BAD_REASONS.items():
        assert reason in s["errors"][k]
    assert s["unet_evals"] == 2 * (N_INV - 1) + 2 * N_INV, "inversion (S-1 calls) + reconstruction (S calls) of 2 images"
    stored = LatentStore(str(tmp_path), key).read("bad")
    assert stored.keys == ["ok1", "ok2"] and stored.latents.shape == (2, 3, 32, 32)
    assert stored.recon_psnr.shape == (2,) and stored.source == shards["bad"]
    again = precompute_shard(world["base"], None, "bad", shards["bad"], str(tmp_path), key)
    assert again["skipped"] and again["unet_evals"] == 0 and again["n_error"] == 4
    with pytest.raises(ConfigError, match="sha256"):
        precompute_shard(world["base"], None, "bad", shards["bad"], str(tmp_path / "x"),
                              LatentKey("0" * 64, T0, N_INV, 32))


def test_three_models_invert_each_image_once_and_every_key_is_there_once(world, tmp_path):
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=world["fts"], t0=None, n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    assert cfg.base == world["base"] and cfg.t0s() == [T0], "base model and t0 come from the models' cards"
    results = restyle_all(cfg, world["data"])
    n_good = 16 + 2
    assert sum(r["n_ok"] for r in results) == n_good and sum(r["n_error"] for r in results) == 4
    assert sum(r["inv_evals"] for r in results) == n_good * (N_INV - 1), "one inversion per image, not three"
    assert sum(r["gen_evals"] for r in results) == n_good * N_GEN * 3, "strength 1: only the fine-tuned model runs"
    report = verify(out, world["data"])
    assert report.ok, report.problems
    assert len(report.outputs) == 3 and sorted(os.listdir(out)) == ["ft1", "ft2", "ft3"]
    rows = {r.key: r for r in read_manifest(f"{out}/ft1/bad.parquet")}
    assert [k for k in rows] == world["keys"]["bad"], "manifest rows in input order, one per key"
    for k, reason in BAD_REASONS.items():
        assert rows[k].status == "error" and reason in rows[k].error
    assert rows["ok1"].status == "ok" and rows["ok1"].metrics["latent"] == "inverted"
    with tarfile.open(f"{out}/ft1/bad.tar") as t:
        assert t.getnames() == ["ok1.json", "ok1.png", "ok1.txt", "ok2.json", "ok2.png"]
        meta = json.loads(t.extractfile("ok1.json").read())
        assert meta["dclip"]["t0"] == T0 and meta["dclip"]["model"] == world["fts"][0]
        assert t.extractfile("ok1.txt").read() == b"a caption", "sidecars are carried over"
    with tarfile.open(f"{out}/ft1/00000.tar") as t:
        meta = json.loads(t.extractfile("0_000000.json").read())
        assert meta["colour"] and meta["dclip"]["latent"] == "inverted", "the input's json is kept and extended"
    shas = {read_manifest(f"{out}/{m}/00000.parquet")[0].sha256 for m in ("ft1", "ft2", "ft3")}
    assert len(shas) == 3, "each model gives its own edit"


def test_cached_latents_are_used_and_a_changed_key_never_reuses_them(world, tmp_path):
    base = cached_base(world["base"])
    lat = str(tmp_path / "lat")
    key = LatentKey(base.sha256, T0, N_INV, 32)
    for n, p in input_shards(world["data"]):
        precompute_shard(world["base"], None, n, p, lat, key)
    cfg = build_restyle_config(str(tmp_path / "a"), models=world["fts"][:1], n_inv_steps=N_INV,
                                    n_gen_steps=N_GEN, latents=lat, batch_size=4)
    res = restyle_all(cfg, world["data"])
    assert sum(r["inv_evals"] for r in res) == 0 and sum(r["n_cached"] for r in res) == 18
    fresh = build_restyle_config(str(tmp_path / "b"), models=world["fts"][:1], n_inv_steps=N_INV,
                                      n_gen_steps=N_GEN, batch_size=4)
    restyle_all(fresh, world["data"])
    a = read_manifest(str(tmp_path / "a" / "ft1" / "00000.parquet"))
    b = read_manifest(str(tmp_path / "b" / "ft1" / "00000.parquet"))
    assert [r.sha256 for r in a] == [r.sha256 for r in b], "cached latents give the same edits as inverting"
    for changed in ({"t0": T0 + 50}, {"n_inv_steps": N_INV + 1}):
        cfg2 = build_restyle_config(str(tmp_path / f"c{len(changed)}{list(changed)[0]}"), models=world["fts"][:1],
                                         **{"n_inv_steps": N_INV, "n_gen_steps": N_GEN, "latents": lat, **changed})
        res2 = restyle_all(cfg2, world["data"])
        assert sum(r["n_cached"] for r in res2) == 0 and sum(r["inv_evals"] for r in res2) > 0, changed


def test_interrupted_run_redoes_only_uncommitted_shards_byte_identically(world, tmp_path):
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=world["fts"][:1], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    restyle_all(cfg, world["data"])
    folder = f"{out}/ft1"  # one output folder per model, whatever their number
    before = files_state(folder)
    # a crash while shard 00001 was being written: its marker is gone and its tar half-written
    os.remove(f"{folder}/00001_stats.json")
    with open(f"{folder}/00001.tar", "r+b") as f:
        f.truncate(1000)
    assert not verify(out, world["data"]).ok
    res = {r["shard"]: r for r in restyle_all(cfg, world["data"])}
    assert [s for s, r in res.items() if not r["skipped"]] == ["00001"]
    after = files_state(folder)
    for name, (mtime, sha) in before.items():
        assert after[name][1] == sha, f"{name} must be byte-identical"
        if not name.startswith("00001"):
            assert after[name][0] == mtime, f"committed {name} must not be rewritten"
    assert verify(out, world["data"]).ok


def test_a_different_configuration_redoes_committed_shards(world, tmp_path):
    out = str(tmp_path / "out")
    kw = dict(models=world["fts"][:1], n_inv_steps=N_INV, batch_size=4)
    restyle_all(build_restyle_config(out, n_gen_steps=N_GEN, **kw), world["data"])
    res = restyle_all(build_restyle_config(out, n_gen_steps=N_GEN + 1, **kw), world["data"])
    assert not any(r["skipped"] for r in res)


def test_verify_reports_every_kind_of_discrepancy(world, tmp_path):
    out = str(tmp_path / "out")
    cfg = build_restyle_config(out, models=world["fts"][:1], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    restyle_all(cfg, world["data"])
    assert verify(out, world["data"]).ok
    out = f"{out}/ft1"  # verify also takes one variant's folder
    rows = read_manifest(f"{out}/00000.parquet")
    write_manifest(rows[1:] + [rows[2]], f"{out}/00000.parquet")  # one key lost, one duplicated
    write_manifest([ManifestRow(r.key, r.shard, r.status, r.error, "0" * 64 if r.key == "ok1" else r.sha256, r.metrics)
                    for r in read_manifest(f"{out}/bad.parquet")], f"{out}/bad.parquet")
    os.remove(f"{out}/00001_stats.json")
    problems = "\n".join(verify(out, world["data"]).problems)
    assert "missing from the manifest" in problems and "more than once" in problems
    assert "'ok1' image sha256 differs" in problems
    assert "00001: not committed" in problems


def test_dry_run_plan_counts_images_and_unet_evaluations(world, tmp_path):
    mix = {"models": world["fts"][:2], "gamma": {"type": "constant", "weights": [0.5, 0.5]}}
    cfg = build_restyle_config(str(tmp_path / "m"), mix=mix, n_inv_steps=N_INV, n_gen_steps=N_GEN)
    p = restyle_plan(cfg, input_shards(world["data"]))
    n_keys = 16 + 6
    assert p["images"] == n_keys and not os.path.exists(tmp_path / "m")
    assert p["unet_evals"] == n_keys * (N_INV - 1) + n_keys * N_GEN * 2, "a 50/50 mix runs both models per step"
    res = restyle_all(cfg, world["data"])
    assert sum(r["gen_evals"] for r in res) == 18 * N_GEN * 2


def test_restyle_config_errors(world, tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match="either --model or --mix"):
        build_restyle_config(out, models=world["fts"], mix={"models": world["fts"], "gamma": {}})
    with pytest.raises(ConfigError, match="strength"):
        build_restyle_config(out, models=world["fts"], strength=1.5)
    with pytest.raises(ConfigError, match="gamma"):
        build_restyle_config(out, mix={"models": world["fts"]})
    with pytest.raises(ConfigError, match="2 weights for 3 models"):
        build_restyle_config(out, mix={"models": world["fts"], "gamma": {"type": "constant", "weights": [0.5, 0.5]}})
    with pytest.raises(ConfigError, match="sum to"):
        build_restyle_config(out, mix={"models": world["fts"][:2], "gamma": {"type": "constant", "weights": [0.5, 0.6]}})
    with pytest.raises(ConfigError, match="--model FT_DIR"):
        build_restyle_config(out)
    with pytest.raises(ConfigError, match="--base"):
        build_restyle_config(out, models=[str(world["root"] / "base")])


def test_cli_dry_run_with_a_mix_file_starts_nothing_and_usage_errors_exit_1(world, tmp_path, capsys):
    import sys

    from dclip_ray.cli import main

    mix = tmp_path / "mix.yaml"
    rel = [os.path.relpath(m, tmp_path) for m in world["fts"][:2]]
    mix.write_text(f"models: {json.dumps(rel)}\ngamma: {{type: piecewise, table: {{150: [1, 0], 0: [0.5, 0.5]}}}}\n")
    capsys.readouterr()
    rc = main(["restyle", "--input", world["data"], "--out", str(tmp_path / "o"), "--mix", str(mix), "--n-inv", "4",
               "--n-gen", "3", "--dry-run", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and not sys.modules["ray"].is_initialized(), "a dry run starts no Ray"
    assert plan["variants"][0]["description"]["mix"]["models"] == world["fts"][:2], "paths relative to the mix file"
    # generation steps t = 200, 100, 0: one model above t=150, both below
    assert plan["unet_evals"] == 22 * 3 + 22 * (1 + 2 + 2) and not os.path.exists(tmp_path / "o")
    assert main(["restyle", "--input", world["data"], "--out", str(tmp_path / "o"), "--model", world["fts"][0],
                 "--format", "gif"]) == 1
    assert main(["restyle", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--model",
                 world["fts"][0], "--dry-run"]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_training_data_from_cached_latents_or_by_inverting(world, tmp_path):
    base = cached_base(world["base"])
    lat = str(tmp_path / "lat")
    shards = dict(input_shards(world["data"]))
    key = LatentKey(base.sha256, T0, N_INV, 32)
    precompute_shard(world["base"], None, "bad", shards["bad"], lat, key)
    keys, x0, z, origin = training_data(base, 5, T0, N_INV, latents_root=lat)
    assert origin == "cache" and keys == ["ok1", "ok2"], "only good images, from the shard the latents name"
    assert torch.equal(z, LatentStore(lat, key).read("bad").latents)
    keys2, x02, z2, origin2 = training_data(base, 3, T0, N_INV, images=shards["bad"])
    assert origin2 == "inverted" and keys2 == ["ok1", "ok2"] and torch.equal(x02, x0)
    assert torch.allclose(z2, z, atol=1e-5), "inverting here gives the cached latents"
    with pytest.raises(ConfigError, match="no cached latents for t0=300"):
        training_data(base, 3, 300, N_INV, latents_root=lat)


def test_finetune_many_refuses_missing_latents_before_starting_ray(world, tmp_path, capsys):
    import sys

    from dclip_ray.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle -> blue circle t0=300\n")
    rc = main(["finetune-many", str(prompts), "--model", world["base"], "--latents", str(tmp_path / "none"),
               "--out", str(tmp_path / "m"), "--clip", "toy_clip", "--clip-weights", str(tmp_path / "x.safetensors")])
    assert rc == 1
    assert "no such file" in capsys.readouterr().err.lower()
    weights = random_clip_weights(tmp_path)
    rc = main(["finetune-many", str(prompts), "--model", world["base"], "--latents", str(tmp_path / "none"),
               "--out", str(tmp_path / "m"), "--clip", "toy_clip", "--clip-weights", weights])
    assert rc == 1 and "no cached latents for t0=300" in capsys.readouterr().err
    assert not sys.modules["ray"].is_initialized() and not os.path.exists(tmp_path / "m")


def test_a_restyle_worker_given_the_model_hashes_does_not_hash_the_models_again(world, tmp_path, monkeypatch):
    """The driver hashes every model once and passes the digests in the config (issue 18)."""
    import dclip_ray.models.base as base_mod
    import dclip_ray.models.cache as cache
    from dclip_ray.stages.restyle import model_shas

    cfg = build_restyle_config(str(tmp_path / "o"), models=world["fts"][:2], n_inv_steps=N_INV, n_gen_steps=N_GEN)
    cfg.model_sha256s = model_shas(cfg)

    def no_hashing(*a, **kw):
        raise AssertionError("a worker hashed a model again")

    for mod in (base_mod, cache):
        monkeypatch.setattr(mod, "state_dict_sha256", no_hashing)
    for name in ("_BASES", "_UNETS", "_SHAS"):
        monkeypatch.setattr(cache, name, {})  # a fresh worker process
    r = ShardRestyler(cfg)
    assert r.shas == cfg.model_sha256s and r.base.sha256 == cfg.model_sha256s[0]
