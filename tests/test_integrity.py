"""Nothing silently wrong (issue 17): outputs that would overwrite inputs are refused, a rewritten input is
detected and redone, a latent-store miss is reported, a NaN or flat image is never committed, bad arguments
fail before any work, verify sees missing variants, strays and temporaries, and two runs on one output do
not both compute a shard.

Tiny random UNets stand in for the models (bookkeeping is under test, not the edit); every case goes
through the CLI (exit code and message) or the unit of work the pipeline runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time

import pytest
import torch
from pipeline_fixtures import make_world, write_shards_like

from dclip_ray.cli import main
from dclip_ray.errors import AbortedError, ConfigError
from dclip_ray.io.images import output_defect
from dclip_ray.io.latents import LatentKey, LatentStore
from dclip_ray.io.leases import acquire_lease, release_lease
from dclip_ray.io.locations import check_outputs, overlap
from dclip_ray.io.manifest import read_manifest
from dclip_ray.io.shards import list_temporaries
from dclip_ray.models.cache import cached_base
from dclip_ray.stages.common import raise_if_leased
from dclip_ray.stages.inputs import fingerprints, input_shards
from dclip_ray.stages.precompute import precompute_shard
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import (
    build_restyle_config,
    check_restyle,
    latent_coverage,
    variant_name,
    write_declaration,
)
from dclip_ray.stages.verify import verify

T0, N_INV, N_GEN = 200, 3, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), T0)


@pytest.fixture
def data(world, tmp_path):
    """A private copy of the good input shards (tests rewrite them)."""
    out = tmp_path / "data"
    out.mkdir()
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(os.path.join(world["data"], name), out / name)
    return str(out)


def tree(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def restyle_cfg(world, out, **kw):
    return build_restyle_config(str(out), models=[world["fts"][0]], n_inv_steps=N_INV, n_gen_steps=N_GEN,
                                     batch_size=4, **kw)


def restyle_all(cfg, data, owner=None):
    r = ShardRestyler(cfg)
    return [r.run(n, p, owner=owner) for n, p in input_shards(data)]


# ---- 1. an output that would overwrite an input is refused ---------------------------------------------
def test_locations_equal_inside_or_containing_overlap(tmp_path):
    d = tmp_path / "D"
    d.mkdir()
    (d / "00000.tar").write_bytes(b"")
    assert overlap(str(d), str(d) + "/") and overlap(str(d) + "/x", str(d)) and overlap(str(tmp_path), str(d / "00000.tar"))
    assert overlap(str(d / "sub"), str(d) + "/{00000..00003}.tar") and overlap(str(d / "s"), str(d) + "/*.tar")
    assert overlap("s3://b/x/", "s3://b/x") and not overlap("s3://b/y", "s3://b/x") and not overlap("s3://b/x", "gs://b/x")
    assert not overlap(str(tmp_path / "E"), str(d)) and not overlap(str(tmp_path / "E"), "toy_shapes")
    os.symlink(d, tmp_path / "L")
    assert overlap(str(tmp_path / "L"), str(d)), "a symlink to the input is the input"
    with pytest.raises(ConfigError, match=r"--out .* is inside --input"):
        check_outputs({"--out": str(d / "o")}, {"--input": str(d)})


def test_restyle_out_equal_to_input_is_refused_and_the_input_is_untouched(world, data, capsys):
    before = tree(data)
    for out in (data, data + "/", os.path.join(data, "edited"), os.path.dirname(data)):
        rc = main(["restyle", "--input", data, "--model", world["fts"][0], "--out", out, "--n-inv", "3", "--n-gen", "2"])
        err = capsys.readouterr().err
        assert rc == 1, out
        assert err.count("\n") == 1 and "--out" in err and "--input" in err and data in err
    assert tree(data) == before, "nothing written into the input"


def test_every_command_refuses_an_output_over_its_inputs(world, data, tmp_path, capsys):
    model = world["fts"][0]
    cases = [
        ["precompute", "--model", world["base"], "--input", data, "--out", data],
        ["restyle", "--input", data, "--model", model, "--out", os.path.dirname(model)],  # would write into the model
        ["restyle", "--input", data, "--model", model, "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "lat" / "o")],
        ["edit", "--model", world["base"], "--finetuned", model, "--images", data, "--out", data],
    ]
    prompts = tmp_path / "p.txt"
    prompts.write_text("red circle -> blue circle name=blue\n")
    cases.append(["finetune-many", str(prompts), "--model", world["base"], "--latents", str(tmp_path / "lat"),
                  "--out", str(tmp_path / "lat"), "--clip", "toy_clip"])
    (tmp_path / "lat").mkdir()
    for argv in cases:
        assert main(argv) == 1, argv
        assert "choose an output folder outside every input" in capsys.readouterr().err, argv


def test_run_refuses_a_spec_whose_outputs_sit_in_its_input(tmp_path, capsys):
    import yaml

    (tmp_path / "data").mkdir()
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "input": {"url": "data"}, "model": "toy_shapes",
                                    "prompts": ["red circle -> blue circle name=blue"],
                                    "outputs": {"root": "data"}}))
    assert main(["run", str(spec), "--check"]) == 1
    assert "inside input.url" in capsys.readouterr().err


# ---- 5. arguments validated before any work --------------------------------------------------------------
def test_bad_arguments_fail_before_any_work(world, data, tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    out = tmp_path / "o"
    model = world["fts"][0]
    cases = {
        "is a file": ["restyle", "--input", data, "--model", model, "--out", str(a_file)],
        "--t0 2000: expected an integer 1..999": ["restyle", "--input", data, "--model", model, "--out", str(out), "--t0", "2000"],
        "--n-gen 1: expected an integer >= 2": ["restyle", "--input", data, "--model", model, "--out", str(out), "--n-gen", "1"],
        "--t0 0: expected an integer 1..999": ["precompute", "--model", world["base"], "--input", data, "--out", str(out), "--t0", "0"],
        "--dtype": ["precompute", "--model", world["base"], "--input", data, "--out", str(out), "--dtype", "int8"],
    }
    for why, argv in cases.items():
        for extra in ([], ["--dry-run"]) if argv[0] == "restyle" else ([],):
            assert main(argv + extra) == 1, (why, extra)
            err = capsys.readouterr().err
            assert why in err and err.count("\n") == 1, err
    assert not out.exists(), "nothing was written"


# ---- 2. a rewritten input is detected: latents, outputs and verify ------------------------------------------
def rewrite_images(path: str, seed: int) -> None:
    """Rewrite a shard with the same keys and other image bytes."""
    write_shards_like(path, seed)


def test_rewritten_input_redoes_latents_and_outputs_and_verify_reports_it(world, data, tmp_path):
    base = cached_base(world["base"])
    key = LatentKey(base.sha256, T0, N_INV, 32)
    shards = dict(input_shards(data))
    lat = str(tmp_path / "lat")
    first = precompute_shard(world["base"], None, "00000", shards["00000"], lat, key)
    assert not first["skipped"]
    assert precompute_shard(world["base"], None, "00000", shards["00000"], lat, key)["skipped"]
    out = tmp_path / "out"
    cfg = restyle_cfg(world, out, latents=lat)
    assert restyle_all(cfg, data)[0]["n_cached"] == 8
    assert verify(str(out), data).ok
    old_keys = LatentStore(lat, key).read("00000").keys

    rewrite_images(shards["00000"], seed=7)  # same keys, other images
    assert verify(str(out), data).problems == [f"{out}/ft1/00000: the input shard changed after this output was written "
                                              "(other image bytes); re-run restyle to redo it"]
    res = restyle_all(restyle_cfg(world, out, latents=lat), data)
    assert not res[0]["skipped"] and res[0]["n_stale"] == 8 and res[0]["n_cached"] == 0, "stale latents never used"
    assert res[0]["inv_evals"] == 8 * (N_INV - 1) and res[1]["skipped"]
    assert verify(str(out), data).ok
    again = precompute_shard(world["base"], None, "00000", shards["00000"], lat, key)
    assert not again["skipped"] and again["unet_evals"] == 8 * (N_INV - 1), "precompute redoes a changed input"
    assert LatentStore(lat, key).read("00000").keys == old_keys
    res = restyle_all(restyle_cfg(world, tmp_path / "out2", latents=lat), data)
    assert res[0]["n_cached"] == 8 and res[0]["n_stale"] == 0, "refreshed latents are used again"


# ---- 3. a latent store that gives nothing is reported -------------------------------------------------------
def test_latent_store_miss_names_the_field_and_require_latents_fails(world, data, tmp_path):
    base = cached_base(world["base"])
    lat = str(tmp_path / "lat")
    store = LatentStore(lat, LatentKey(base.sha256, T0, N_INV + 2, 32))
    shards = input_shards(data)
    for n, p in shards:
        precompute_shard(world["base"], None, n, p, lat, store.key)
    prints = fingerprints(shards)
    cfg = restyle_cfg(world, tmp_path / "o", latents=lat)
    check_restyle(cfg, data)
    (warning,) = latent_coverage(cfg, shards, prints)
    assert "no cached latent matches" in warning and f"n_inv_steps {N_INV + 2} (this run: {N_INV})" in warning
    with pytest.raises(ConfigError, match="n_inv_steps"):
        latent_coverage(cfg, shards, prints, require=True)
    # the digest folder precompute prints is accepted as the store
    good = LatentStore(lat, LatentKey(base.sha256, T0, N_INV, 32))
    precompute_shard(world["base"], None, shards[0][0], shards[0][1], lat, good.key)
    cfg = restyle_cfg(world, tmp_path / "o", latents=good.dir)
    check_restyle(cfg, data)
    assert cfg.latents == lat
    (partial,) = latent_coverage(cfg, shards, prints)
    assert "1 of 2 input shard(s) have no current latents" in partial
    with pytest.raises(ConfigError, match="run `dclip-ray precompute`"):
        latent_coverage(cfg, shards, prints, require=True)


def test_require_latents_without_a_store_is_a_usage_error(world, data, tmp_path, capsys):
    assert main(["restyle", "--input", data, "--model", world["fts"][0], "--out", str(tmp_path / "o"),
                 "--n-inv", "3", "--n-gen", "2", "--require-latents", "--dry-run"]) == 1
    assert "--require-latents needs --latents" in capsys.readouterr().err


# ---- 4. NaN or flat images are never committed ----------------------------------------------------------------
def test_output_defect():
    x = torch.rand(3, 8, 8) * 2 - 1
    assert output_defect(x) is None
    y = x.clone()
    y[0, 1, 1] = float("nan")
    assert output_defect(y).startswith("non-finite output: 1 of 192")
    assert output_defect(torch.full((3, 8, 8), -1.0)).startswith("blank output: every pixel is (0,0,0)")


def test_restyle_commits_no_nan_image(world, data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = restyle_cfg(world, out)
    r = ShardRestyler(cfg)
    r.variant_eps[0] = lambda x, t: torch.full_like(x, float("nan"))  # a diverged model
    res = [r.run(n, p) for n, p in input_shards(data)]
    assert [x["n_ok"] for x in res] == [0, 0] and [x["n_error"] for x in res] == [8, 8]
    rows = read_manifest(str(out / "ft1" / "00000.parquet"))
    assert {row.status for row in rows} == {"error"} and all(row.error.startswith("non-finite output") for row in rows)
    with tarfile.open(out / "ft1" / "00000.tar") as t:
        assert t.getnames() == []
    assert verify(str(out), data).ok, "every key is accounted for (as an error row)"


# ---- 7. verify sees a deleted variant, a stray shard and leftovers ---------------------------------------------
def test_verify_flags_a_deleted_variant_a_stray_shard_and_temporaries(world, data, tmp_path):
    out = tmp_path / "out"
    cfg = build_restyle_config(str(out), models=world["fts"][:2], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    write_declaration(cfg, data)
    restyle_all(cfg, data)
    assert verify(str(out), data).ok
    name = variant_name(world["fts"][1])
    shutil.rmtree(out / name)
    problems = verify(str(out), data).problems
    assert problems == [f"{out}/{name}: a declared output folder is missing: every key of this variant is lost; "
                        "re-run restyle to write it"]
    restyle_all(cfg, data)
    v0 = out / variant_name(world["fts"][0])
    shutil.copy(v0 / "00000.tar", v0 / "00099.tar")
    (v0 / "00001.tar.tmp-4242").write_bytes(b"half")
    problems = verify(str(out), data).problems
    assert len(problems) == 2
    assert "1 temporary file(s) left by a write that did not finish" in problems[0]
    assert "00099.tar: no input shard named '00099' explains it; it duplicates 8 input key(s)" in problems[1]


# ---- 11. leftovers of a crashed write are removed by the re-run ------------------------------------------------
def test_a_rerun_removes_its_shards_stale_temporaries(world, data, tmp_path):
    out = tmp_path / "out"
    (out / "ft1").mkdir(parents=True)
    (out / "ft1" / "00000.tar.tmp-999999").write_bytes(b"left by a full disk")
    (out / "ft1" / "00000_stats.json.tmp-999998").write_bytes(b"")
    assert len(list_temporaries(str(out / "ft1"))) == 2
    restyle_all(restyle_cfg(world, out), data, owner="run-a")
    assert list_temporaries(str(out / "ft1")) == [] and verify(str(out), data).ok


# ---- 12. two runs on one output: a leased shard is left to the run that holds it --------------------------------
def test_a_shard_leased_by_another_run_is_not_computed_twice(world, data, tmp_path):
    root = str(tmp_path / "out")
    out = f"{root}/ft1"  # the lease lives beside the first output
    assert acquire_lease(out, "00000", "run-b") is None
    res = restyle_all(restyle_cfg(world, root), data, owner="run-a")
    assert res[0]["leased"].startswith("being written by run run-b") and res[0]["gen_evals"] == 0
    assert not res[1]["leased"] and res[1]["n_ok"] == 8
    assert not os.path.exists(f"{out}/00001.lease"), "a lease is released when the shard is committed"
    with pytest.raises(AbortedError, match="1 shard\\(s\\) left to another run"):
        raise_if_leased({r["shard"]: r["leased"] for r in res if r["leased"]})
    release_lease(out, "00000", "run-a")  # not the holder: nothing happens
    assert os.path.exists(f"{out}/00000.lease")
    lease = json.loads(open(f"{out}/00000.lease").read())
    lease["expires"] = time.time() - 1  # its run died: the lease expires
    open(f"{out}/00000.lease", "w").write(json.dumps(lease))
    res = restyle_all(restyle_cfg(world, root), data, owner="run-a")
    assert res[0]["n_ok"] == 8 and res[1]["skipped"]
    assert verify(root, data).ok


def test_the_lease_of_a_run_whose_driver_is_gone_is_taken_at_once(world, data, tmp_path):
    import socket
    import subprocess
    import sys

    root = str(tmp_path / "out")
    out = f"{root}/ft1"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names no process now
    assert acquire_lease(out, "00000", f"crashed:{socket.gethostname()}:{dead.pid}") is None
    assert acquire_lease(out, "00000", f"alive:{socket.gethostname()}:{os.getpid()}") is None, "the dead run's lease is free"
    assert acquire_lease(out, "00000", "third:elsewhere:1") is not None, "a live run's lease is not"
    res = restyle_all(restyle_cfg(world, root), data, owner=f"alive:{socket.gethostname()}:{os.getpid()}")
    assert res[0]["n_ok"] == 8 and not os.path.exists(f"{out}/00000.lease")


# ---- one t0 rule and one base-model check for every command (issue 18 item 1) ------------------------------
def test_restyle_warns_of_a_model_fine_tuned_from_another_base_and_takes_t0_by_the_one_rule(world, data, tmp_path):
    from dclip_ray.errors import DclipWarning
    from dclip_ray.models.base import edit_t0
    from dclip_ray.models.card import read_card

    other = tmp_path / "other"
    shutil.copytree(world["fts"][0], other)
    card = json.loads((other / "dclip.json").read_text())
    (other / "dclip.json").write_text(json.dumps({**card, "base_model_sha256": "f" * 64}))
    cfg = build_restyle_config(str(tmp_path / "o"), models=[str(other)], n_inv_steps=N_INV, n_gen_steps=N_GEN)
    with pytest.warns(DclipWarning, match="fine-tuned from another base model"):
        check_restyle(cfg, data)
    assert cfg.t0s() == [T0] == [edit_t0(None, [read_card(str(other))])], "the card's t0"
    assert edit_t0(300, [read_card(str(other))]) == 300 and edit_t0(None, []) == 500
    toy = cached_base("toy_shapes").preset
    assert toy.t0 and edit_t0(None, [], toy) == toy.t0


def test_a_second_run_waits_for_the_shards_another_run_is_writing(tmp_path):
    import threading

    from dclip_ray.stages.common import await_leased

    out = str(tmp_path / "out")
    done: set[str] = set()
    assert acquire_lease(out, "a", "other:elsewhere:1") is None and acquire_lease(out, "b", "other:elsewhere:1") is None

    def other_run():  # commits a, then gives up b without committing it
        time.sleep(0.3)
        done.add("a")
        release_lease(out, "a", "other:elsewhere:1")
        time.sleep(0.3)
        release_lease(out, "b", "other:elsewhere:1")

    t = threading.Thread(target=other_run)
    t.start()
    left = await_leased({"a": "held", "b": "held"}, out, lambda s: s in done, poll=0.05, timeout=30)
    t.join()
    assert left == {"b": "held"}, "a was committed by the other run; b was not and is reported"
    assert await_leased({"c": "held"}, out, lambda s: False, poll=0.05, timeout=30) == {"c": "held"}, \
        "no live lease: nothing to wait for"


def test_the_driver_plans_by_size_and_time_and_the_worker_checks_the_content(world, data, tmp_path, monkeypatch):
    """Issue 28 item 3: the driver reads no input byte (a local tar's size and modification time); the
    worker that reads the shard computes its content fingerprint and records both. A touched input (new
    time, same bytes) is planned again but found committed by content (nothing rewritten); a rewritten
    one is redone."""
    import dclip_ray.io.sources as sources
    from dclip_ray.stages.restyle import model_shas, shard_done

    out = tmp_path / "out"
    cfg = restyle_cfg(world, out)
    shards = input_shards(data)
    worker = ShardRestyler(cfg)
    planned = fingerprints(shards, plan=True)
    assert all(p.startswith(sources.STAT_PREFIX) for p in planned.values())
    assert all(worker.run(n, p, planned[n])["n_ok"] == 8 for n, p in shards)
    hashes = [cfg.variant_hash(v, model_shas(cfg)) for v in cfg.variants]

    def no_read(*_: object) -> str:
        raise AssertionError("the driver read an input's bytes")

    with monkeypatch.context() as m:
        m.setattr(sources, "_sha256_of", no_read)
        prints = fingerprints(shards, plan=True)
        assert all(shard_done(cfg, hashes, n, prints[n]) for n, _ in shards), "committed: planned from stats alone"

    before = tree(out)
    (n0, p0), (n1, p1) = shards
    st = os.stat(p0)
    os.utime(p0, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touched: same bytes
    prints = fingerprints(shards, plan=True)
    assert not shard_done(cfg, hashes, n0, prints[n0]), "a new time: the driver cannot know, the worker checks"
    assert worker.run(n0, p0, prints[n0])["skipped"] and tree(out) == before, "same content: nothing redone"

    rewrite_images(p1, seed=7)  # same keys, other image bytes
    prints = fingerprints(shards, plan=True)
    assert not shard_done(cfg, hashes, n1, prints[n1])
    redone = worker.run(n1, p1, prints[n1])
    assert not redone["skipped"] and redone["n_ok"] == 8 and verify(str(out), data).ok
    marker = json.loads((out / "ft1" / "00001_stats.json").read_text())
    assert marker["source_stat"] == sources.shard_stat(p1) and marker["source_fingerprint"].startswith("sha256:")
