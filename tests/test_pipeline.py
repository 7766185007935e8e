"""The pipeline on a local Ray (2 CPUs): precompute -> restyle (Ray Data actor pool) -> verify, via the CLI.

Tiny random UNets stand in for the models (bookkeeping is under test, not edit quality). Ray Train
(`finetune-many`) is tested in tests/test_pipeline_train.py, which needs the dashboard on.
"""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
import ray
import webdataset as wds
from fault_restylers import CrashBeforeCommit, DieAfterCommit
from pipeline_fixtures import BAD_REASONS, make_world

from dclip_ray.cli import main
from dclip_ray.io.manifest import read_manifest

T0, N_INV, N_GEN = 200, 4, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), T0)


def run_json(capsys, argv):
    capsys.readouterr()
    rc = main(argv + ["--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def snapshot(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return out


def test_precompute_restyle_three_models_verify_and_rerun(ray_local, world, tmp_path, capsys):
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    rc, pre = run_json(capsys, ["precompute", "--model", world["base"], "--input", world["data"], "--t0", str(T0),
                                "--n-inv", str(N_INV), "--out", lat, "--batch-size", "4"])
    assert rc == 2, "bad members are per-item errors"
    assert pre["n_images"] == 18 and pre["n_errors"] == 4 and len(pre["shards"]) == 3
    for k, reason in BAD_REASONS.items():
        assert reason in pre["errors"][k]
    rc, again = run_json(capsys, ["precompute", "--model", world["base"], "--input", world["data"], "--t0", str(T0),
                                  "--n-inv", str(N_INV), "--out", lat])
    assert rc == 2 and again["n_skipped"] == 3 and again["n_images"] == 0, "committed shards are skipped"

    argv = ["restyle", "--input", world["data"], "--out", out, "--latents", lat, "--n-inv", str(N_INV),
            "--n-gen", str(N_GEN), "--batch-size", "4"]
    for m in world["fts"]:
        argv += ["--model", m]
    rc, plan = run_json(capsys, argv + ["--dry-run"])
    assert rc == 0 and not os.path.exists(out)
    assert plan["images"] == 22 and plan["unet_evals"] == (22 - 18) * (N_INV - 1) + 22 * N_GEN * 3

    rc, s = run_json(capsys, argv)
    assert rc == 2 and s["n_images"] == 18 and s["n_errors"] == 4
    assert s["inv_evals"] == 0, "every good image came from the latent cache"
    assert s["gen_evals"] == 18 * N_GEN * 3
    assert s["images_done"] == 22 and s["work_seconds"] > 0  # throughput over the whole job (issue 28 item 5)
    assert s["images_per_s"] == pytest.approx(22 / s["work_seconds"], rel=0.01, abs=0.01)
    assert s["unet_evals_per_s"] == pytest.approx(18 * N_GEN * 3 / s["work_seconds"], rel=0.01, abs=0.01)
    worked = [r for r in s["shards"] if not r.get("skipped")]
    assert all(0 < r["unet_seconds"] <= r["seconds"] for r in worked if r["n_ok"]), "UNet time is part of the shard's"
    assert 0 < s["unet_share"] <= 1 and s["unet_share"] == pytest.approx(
        sum(r["unet_seconds"] for r in worked) / sum(r["seconds"] for r in worked), abs=0.001)
    assert main(["verify", out, "--input", world["data"]]) == 0
    from dclip_ray.pipeline.verify import run_verify
    from dclip_ray.stages.verify import verify

    tasks = run_verify(out, world["data"])  # Ray is up: one task per input shard
    assert tasks.ok and tasks.as_dict() == verify(out, world["data"]).as_dict(), "the same report as threads"

    ft1 = os.path.join(out, "ft1")
    samples = list(wds.WebDataset(os.path.join(ft1, "0000{0..1}.tar"), shardshuffle=False).decode("rgb"))
    assert [x["__key__"] for x in samples] == world["keys"]["00000"] + world["keys"]["00001"]
    assert samples[0]["png"].shape == (32, 32, 3) and samples[0]["json"]["dclip"]["variant"] == "ft1"
    rows = ray.data.read_webdataset(os.path.join(ft1, "bad.tar")).take_all()
    assert sorted(r["__key__"] for r in rows) == ["ok1", "ok2"]
    errors = {r.key: r.error for r in read_manifest(os.path.join(ft1, "bad.parquet")) if r.status == "error"}
    assert set(errors) == set(BAD_REASONS)

    before = snapshot(out)
    rc, s2 = run_json(capsys, argv)
    assert rc == 2 and s2["n_skipped"] == 3 and s2["gen_evals"] == 0
    assert snapshot(out) == before, "a re-run leaves committed shards byte-identical (and untouched)"


def test_limit_and_strength_without_cache(ray_local, world, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, s = run_json(capsys, ["restyle", "--input", world["data"], "--out", out, "--model", world["fts"][0],
                              "--strength", "0.5", "--n-inv", str(N_INV), "--n-gen", str(N_GEN), "--limit", "5"])
    assert rc == 0 and [r["shard"] for r in s["shards"]] == ["00000"], "--limit 5 needs only the first shard"
    assert s["inv_evals"] == 8 * (N_INV - 1) and s["gen_evals"] == 8 * N_GEN * 2, "r = 0.5 runs both models"
    assert main(["verify", out, "--input", os.path.join(world["data"], "00000.tar")]) == 0
    assert main(["verify", out, "--input", world["data"]]) == 2, "the other shards are missing"


def restyle_with_fault(world, tmp_path, fault, monkeypatch):
    """Restyle shards 00000 and bad with one model on one actor whose restyler is ``fault`` (a class of
    fault_restylers taking a flag file); returns ``(summary, out, inputs, flag)``."""
    from dclip_ray.pipeline import restyle
    from dclip_ray.pipeline.restyle import RestyleJob, run_restyle
    from dclip_ray.stages.restyle_config import build_restyle_config

    out, flag = str(tmp_path / "out"), tmp_path / "fault-fired"
    cfg = build_restyle_config(out, models=world["fts"][:1], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)
    inputs = os.path.join(world["data"], "{00000,bad}.tar")
    monkeypatch.setattr(restyle, "ShardRestyler", partial(fault, flag=str(flag)))  # what the driver hands the actors
    s = run_restyle(RestyleJob(cfg, inputs, actors=1), progress=False)
    return s, out, inputs, flag


def test_a_worker_dying_before_its_commit_is_retried_without_duplicates(ray_local, world, tmp_path, monkeypatch):
    """An actor killed between writing a shard and its commit marker: Ray Data retries the shard on a new
    actor, which rewrites the same names; every key ends up exactly once."""
    from dclip_ray.stages.verify import verify

    s, out, inputs, flag = restyle_with_fault(world, tmp_path, CrashBeforeCommit, monkeypatch)
    assert flag.exists(), "the hook killed a worker"
    assert s["n_images"] == 8 + 2 and s["n_errors"] == 4 and not s["failed"]
    report = verify(out, inputs)
    assert report.ok, report.problems
    assert sum(x["n"] for x in report.shards) == 8 + 6


def test_a_row_lost_after_its_commit_still_counts_the_shards_images(ray_local, world, tmp_path, monkeypatch):
    """An actor dying after a shard's commit and before its row returns (a node lost at that moment):
    the retried row finds the shard committed, and the summary still counts its images and errors."""
    from dclip_ray.stages.verify import verify

    s, out, inputs, flag = restyle_with_fault(world, tmp_path, DieAfterCommit, monkeypatch)
    assert flag.exists(), "the hook killed a worker after a commit"
    assert s["n_images"] == 8 + 2 and s["n_errors"] == 4 and not s["failed"]
    assert [r["shard"] for r in s["shards"] if r.get("done_by")], "the retried row says who committed it"
    assert verify(out, inputs).ok


@pytest.mark.slow  # the Ray CLI path of tests/test_hostile.py's rules (make test-slow, CI)
def test_an_unreadable_shard_fails_its_shard_with_exit_2_and_is_retried(ray_local, world, tmp_path, capsys):
    """Issue 30 item 1 through the commands: a 0-byte shard and a cut one among good shards were
    committed as done (exit 0, verify OK); now they are listed as unreadable, exit 2, tried again."""
    from pipeline_fixtures import make_inputs

    data, _ = make_inputs(tmp_path / "in", n=8, shard_size=8, cut=True)
    (tmp_path / "in" / "data" / "empty.tar").write_bytes(b"")
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    rc, pre = run_json(capsys, ["precompute", "--model", world["base"], "--input", data, "--t0", str(T0),
                                "--n-inv", str(N_INV), "--out", lat])
    assert rc == 2 and sorted(pre["unreadable"]) == ["cut", "empty"] and pre["n_images"] == 8 + 2
    argv = ["restyle", "--input", data, "--out", out, "--latents", lat, "--model", world["fts"][0],
            "--n-inv", str(N_INV), "--n-gen", str(N_GEN)]
    rc, s = run_json(capsys, argv)
    assert rc == 2 and sorted(s["unreadable"]) == ["cut", "empty"] and s["n_images"] == 8 + 2
    assert main(["verify", out, "--input", data]) == 2
    rc, again = run_json(capsys, argv)
    assert rc == 2 and sorted(r["shard"] for r in again["shards"] if not r.get("skipped")) == ["cut", "empty"]


@pytest.mark.slow  # the Ray CLI path of tests/test_hostile.py's rules (make test-slow, CI)
def test_a_shard_that_cannot_be_written_aborts_with_exit_3_and_the_rest_is_committed(ray_local, world, tmp_path,
                                                                                     capsys):
    """Issue 30 item 15: a read-only store or a full disk gave exit 1 ("nothing started") after shards were
    committed. A write that fails is the run's abort (exit 3); the other shards are committed, a re-run
    resumes."""
    from dclip_ray.io.latents import LatentKey
    from dclip_ray.models.cache import cached_base

    lat = tmp_path / "lat"
    key = LatentKey(cached_base(world["base"]).sha256, T0, N_INV, 32)
    blocker = lat / key.digest / "00001.safetensors"
    blocker.mkdir(parents=True)  # a folder where the shard's file goes: its write fails, as on a full disk
    argv = ["precompute", "--model", world["base"], "--input", world["data"], "--t0", str(T0), "--n-inv", str(N_INV),
            "--out", str(lat)]
    capsys.readouterr()
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 3 shard(s) could not be written (e.g. 00001" in err[0], err
    assert (lat / key.digest / "00000_stats.json").exists() and not (lat / key.digest / "00001_stats.json").exists()
    blocker.rmdir()
    rc, again = run_json(capsys, argv)
    assert rc == 2 and again["n_skipped"] == 2 and [r["shard"] for r in again["shards"] if not r.get("skipped")] == [
        "00001"]


@pytest.mark.slow  # the Ray CLI path of tests/test_hostile.py's rules (make test-slow, CI)
def test_workers_that_cannot_load_their_models_abort_in_one_line(ray_local, world, tmp_path, capfd, monkeypatch):
    """Issue 30 item 15: a model folder deleted while restyle ran gave an ActorDiedError traceback, then
    ~100 lines of Ray Data's "Full stack trace" above the one-line error."""
    from fault_restylers import CannotLoad

    from dclip_ray.errors import AbortedError
    from dclip_ray.pipeline import restyle
    from dclip_ray.pipeline.restyle import RestyleJob, run_restyle
    from dclip_ray.stages.restyle_config import build_restyle_config

    cfg = build_restyle_config(str(tmp_path / "out"), models=world["fts"][:1], n_inv_steps=N_INV, n_gen_steps=N_GEN)
    with pytest.raises(AbortedError) as e:
        monkeypatch.setattr(restyle, "ShardRestyler", CannotLoad)
        run_restyle(RestyleJob(cfg, world["data"], actors=1), progress=False)
    msg = str(e.value)
    assert "the restyle workers stopped" in msg and "no such file (deleted)" in msg and "\n" not in msg, msg
    assert "dclip_ray." not in msg, msg  # the cause by its class name, not its module path
    err = capfd.readouterr().err
    assert "Full stack trace" not in err and "Traceback" not in err, err[-3000:]


def test_a_touched_input_is_checked_by_its_content_and_not_restyled_again(ray_local, world, tmp_path):
    """Issue 28 item 3: the driver plans by size and time; a shard whose time changed goes to a worker,
    which finds it committed from the same content: nothing is rewritten, nothing counted as done again,
    and the summary says why it was looked at."""
    import shutil

    from dclip_ray.pipeline.restyle import RestyleJob, run_restyle
    from dclip_ray.stages.restyle_config import build_restyle_config

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    out = str(tmp_path / "out")

    def restyle() -> dict:
        cfg = build_restyle_config(out, models=world["fts"][:1], n_inv_steps=N_INV, n_gen_steps=N_GEN)
        return run_restyle(RestyleJob(cfg, str(data), actors=1), progress=False)

    first = restyle()
    before = snapshot(out)
    st = os.stat(data / "00000.tar")
    os.utime(data / "00000.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 3 * 10**9))
    again = restyle()
    row = next(r for r in again["shards"] if r["shard"] == "00000")
    assert row["skipped"] and "content did not" in row["done_by"], row
    assert again["n_images"] == 0 and snapshot(out) == before and first["n_images"] > 0
