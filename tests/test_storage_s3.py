"""The pipeline against a real S3 API: a moto server on 127.0.0.1 (a free port, started and stopped
here, with IAM authentication enforced) through s3fs. Inputs, latents and outputs all live on s3://.

A half-uploaded object (a tar without its commit marker, a marker whose tar does not match it) is never
taken as committed; wrong credentials are a one-line error with exit code 1 that shows no secret.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from pipeline_fixtures import make_inputs, tiny_unet_dir

pytest.importorskip("moto")
s3fs = pytest.importorskip("s3fs")

import fsspec  # noqa: E402

from dclip_ray.cli import main  # noqa: E402
from dclip_ray.io.manifest import read_manifest  # noqa: E402
from dclip_ray.models.cache import cached_base  # noqa: E402
from dclip_ray.stages.inputs import input_shards  # noqa: E402
from dclip_ray.stages.precompute import precompute_shard  # noqa: E402
from dclip_ray.stages.restyle import ShardRestyler  # noqa: E402
from dclip_ray.stages.restyle_config import build_restyle_config  # noqa: E402
from dclip_ray.stages.verify import verify  # noqa: E402

T0, N_INV, N_GEN = 200, 2, 2
BUCKET = "dclip"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    admin = {"endpoint_url": endpoint, "aws_access_key_id": "admin", "aws_secret_access_key": "admin",
             "region_name": "us-east-1"}
    old_auth = settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="pipeline")
        iam.put_user_policy(UserName="pipeline", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="pipeline")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is authenticated
        conf = {"endpoint_url": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                "client_kwargs": {"region_name": "us-east-1"}}
        old_conf = fsspec.config.conf.get("s3")
        fsspec.config.conf["s3"] = conf
        os.environ["FSSPEC_S3"] = json.dumps(conf)  # Ray workers started from here read it at import
        root = tmp_path_factory.mktemp("s3world")
        torch.set_num_threads(1)
        data, keys = make_inputs(root)
        fs = s3fs.S3FileSystem(**{k: v for k, v in conf.items()})
        for name in sorted(os.listdir(data)):
            fs.put_file(os.path.join(data, name), f"{BUCKET}/in/{name}")
        base = tiny_unet_dir(root / "base", 0)
        ft = tiny_unet_dir(root / "ft", 1, {"base_model": base, "config": {"t0": T0}})
        yield {"fs": fs, "conf": conf, "input": f"s3://{BUCKET}/in", "keys": keys, "base": base, "ft": ft,
               "secret": key["SecretAccessKey"]}
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = old_auth
        os.environ.pop("FSSPEC_S3", None)
        if "old_conf" in locals():
            if old_conf is None:
                fsspec.config.conf.pop("s3", None)
            else:
                fsspec.config.conf["s3"] = old_conf
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def restyle_all(cfg, url):
    r = ShardRestyler(cfg)
    return {n: r.run(n, p) for n, p in input_shards(url)}


def test_precompute_restyle_verify_on_s3_and_half_uploads_are_never_committed(s3):
    from dclip_ray.io.latents import LatentKey

    fs = s3["fs"]
    shards = input_shards(s3["input"])
    assert [n for n, _ in shards] == ["00000", "00001", "bad"] and shards[0][1].startswith("s3://")
    base = cached_base(s3["base"])
    key = LatentKey(base.sha256, T0, N_INV, 32)
    lat = f"s3://{BUCKET}/latents"
    for n, p in shards:
        precompute_shard(s3["base"], None, n, p, lat, key, batch_size=4)
    out = f"s3://{BUCKET}/out"
    cfg = build_restyle_config(out, models=[s3["ft"]], n_inv_steps=N_INV, n_gen_steps=N_GEN, latents=lat,
                                    batch_size=4)
    res = restyle_all(cfg, s3["input"])
    assert sum(r["n_ok"] for r in res.values()) == 18 and sum(r["n_error"] for r in res.values()) == 4
    assert sum(r["n_cached"] for r in res.values()) == 18 and sum(r["inv_evals"] for r in res.values()) == 0
    report = verify(out, s3["input"])
    assert report.ok, report.problems
    assert {r.key for r in read_manifest(f"{out}/ft/bad.parquet")} == set(s3["keys"]["bad"])
    fs.invalidate_cache()
    state = {p: fs.info(p)["ETag"] for p in fs.ls(f"{BUCKET}/out/ft")}

    # half uploads: a tar whose marker never arrived, a tar replaced after its marker
    fs.rm(f"{BUCKET}/out/ft/00001_stats.json")
    fs.pipe(f"{BUCKET}/out/ft/00000.tar", fs.cat(f"{BUCKET}/out/ft/00000.tar")[:-1024])
    fs.invalidate_cache()
    assert not verify(out, s3["input"]).ok
    again = restyle_all(cfg, s3["input"])
    assert sorted(n for n, r in again.items() if not r["skipped"]) == ["00000", "00001"]
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.ls(f"{BUCKET}/out/ft")} == state, "redone shards are byte-identical"
    assert verify(out, s3["input"]).ok


def test_wrong_credentials_and_secrets_in_urls_are_one_line_errors_without_the_secret(s3, capsys, monkeypatch):
    monkeypatch.setitem(fsspec.config.conf, "s3", {**s3["conf"], "key": "AKIAWRONG", "secret": "wrongsecret"})
    s3fs.S3FileSystem.clear_instance_cache()
    for argv in (["verify", f"s3://{BUCKET}/out", "--input", s3["input"]],
                 ["restyle", "--input", s3["input"], "--out", f"s3://{BUCKET}/o2", "--model", s3["ft"], "--dry-run"]):
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "credentials" in err, err
        assert "wrongsecret" not in err and s3["secret"] not in err
    monkeypatch.setitem(fsspec.config.conf, "s3", s3["conf"])
    s3fs.S3FileSystem.clear_instance_cache()
    capsys.readouterr()
    assert main(["verify", f"s3://{BUCKET}/nothing", "--input", f"s3://AKIAFAKE:supersecret@{BUCKET}/missing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "supersecret" not in err and "AKIAFAKE" not in err, err


@pytest.mark.slow
def test_the_cli_pipeline_on_ray_reads_and_writes_s3(s3, tmp_path, capsys):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        lat, out = f"s3://{BUCKET}/ray-latents", f"s3://{BUCKET}/ray-out"
        capsys.readouterr()
        assert main(["precompute", "--model", s3["base"], "--input", s3["input"], "--t0", str(T0), "--n-inv",
                     str(N_INV), "--out", lat, "--json"]) == 2
        pre = json.loads(capsys.readouterr().out)
        assert pre["n_images"] == 18 and pre["n_errors"] == 4
        assert main(["restyle", "--input", s3["input"], "--out", out, "--model", s3["ft"], "--latents", lat,
                     "--n-inv", str(N_INV), "--n-gen", str(N_GEN), "--json"]) == 2
        s = json.loads(capsys.readouterr().out)
        assert s["n_images"] == 18 and s["inv_evals"] == 0 and not s["failed"]
        assert main(["verify", out, "--input", s3["input"]]) == 0
    finally:
        ray.shutdown()
