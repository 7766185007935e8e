"""Reliability on a local Ray (2 CPUs): a stuck shard is reported after --shard-timeout while the other
shards finish; a restyle actor SIGKILLed mid-shard is replaced and every key ends up exactly once.

Other fault scenarios and where they are tested:
(b) a killed driver re-run: tests/test_pipeline_train.py (acceptance);
(c) a worker node removed from a two-node cluster: tests/test_reliability_cluster.py (slow);
(d) a fine-tuning worker that raises once resumes from its checkpoint: tests/test_pipeline_train.py;
(e) a crash after a shard's tar is written, before its commit marker: tests/test_pipeline.py.
"""

from __future__ import annotations

import json
import os
from functools import partial

import pytest
import torch
from fault_restylers import HangOnBad, KillMidBatch
from pipeline_fixtures import interrupted_run, make_inputs, tiny_unet_dir, tree

from dclip_ray.cli import main
from dclip_ray.stages.inputs import input_shards
from dclip_ray.stages.restyle import ShardRestyler
from dclip_ray.stages.restyle_config import build_restyle_config
from dclip_ray.stages.verify import verify

T0, N_INV, N_GEN = 200, 2, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    data, keys = make_inputs(root)
    base = tiny_unet_dir(root / "base", 0)
    ft = tiny_unet_dir(root / "ft", 1, {"base_model": base, "config": {"t0": T0}})
    return {"data": data, "keys": keys, "ft": ft}


def test_sigterm_after_ray_started_exits_3_with_one_line(world, tmp_path):
    """``ray.init`` replaces the SIGTERM handler with one that exits 1 (issue 17 item 6): the CLI's comes back.

    Runs before the module's own Ray starts (it starts an embedded one in a subprocess)."""
    import signal

    argv = ["restyle", "--input", world["data"], "--out", str(tmp_path / "out"), "--model", world["ft"]]
    rc, stdout, stderr = interrupted_run(tmp_path, "dclip_ray.pipeline.runtime.quiet_ray_data", argv, signal.SIGTERM)
    assert (rc, stderr.strip()) == (3, "error: interrupted (SIGTERM); re-run the same command to resume"), (rc, stderr)


def test_a_stuck_shard_is_reported_after_the_timeout_and_the_others_finish(ray_local, world, tmp_path, capsys,
                                                                          monkeypatch):
    import dclip_ray.pipeline.restyle as restyle

    build = build_restyle_config
    monkeypatch.setattr(restyle, "ShardRestyler", HangOnBad)  # the actors build a restyler that hangs on "bad"
    inputs = os.path.join(world["data"], "{00000,bad}.tar")
    out = str(tmp_path / "out")
    argv = ["restyle", "--input", inputs, "--out", out, "--model", world["ft"], "--n-inv", str(N_INV), "--n-gen",
            str(N_GEN), "--actors", "1", "--cpus-per-actor", "0.5", "--shard-timeout", "4"]
    capsys.readouterr()
    assert main(argv + ["--json"]) == 2, "finished, with a stuck shard"
    s = json.loads(capsys.readouterr().out)
    assert list(s["stuck"]) == ["bad"] and "no result after 4 s" in s["stuck"]["bad"]
    assert s["n_images"] == 8 and not s["failed"], "the other shard finished"
    problems = verify(out, inputs).problems
    assert problems == [f"{out}/ft/bad: not committed (no bad_stats.json)"]
    # the shard stayed uncommitted: a re-run (here the same unit of work, without Ray) redoes only it
    restyler = ShardRestyler(build(out, models=[world["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN))
    again = {n: restyler.run(n, p) for n, p in input_shards(inputs)}
    assert [n for n, r in again.items() if not r["skipped"]] == ["bad"] and again["bad"]["n_error"] == 4
    assert verify(out, inputs).ok


@pytest.mark.slow
def test_a_restyle_actor_sigkilled_mid_shard_loses_and_duplicates_nothing(ray_local, world, tmp_path, monkeypatch):
    from dclip_ray.pipeline import restyle
    from dclip_ray.pipeline.restyle import RestyleJob, run_restyle

    def config(out):
        return build_restyle_config(out, models=[world["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN, batch_size=4)

    inputs = world["data"]
    clean = str(tmp_path / "clean")
    run_restyle(RestyleJob(config(clean), inputs, actors=1), progress=False)
    out, flag = str(tmp_path / "out"), tmp_path / "killed"
    cfg = config(out)
    monkeypatch.setattr(restyle, "ShardRestyler", partial(KillMidBatch, flag=str(flag)))  # the actors' restyler
    s = run_restyle(RestyleJob(cfg, inputs, actors=2), progress=False)
    assert flag.exists(), "an actor was SIGKILLed after its first batch"
    assert s["n_images"] == 18 and s["n_errors"] == 4 and not s["failed"]
    report = verify(out, inputs)
    assert report.ok, report.problems
    assert sum(x["n"] for x in report.shards) == sum(len(set(k)) for k in world["keys"].values())
    assert tree(out) == tree(clean), "the retried shard is byte-identical to an uninterrupted run"
