"""Security for data and models from strangers: checkpoints never run code unless trusted, credentials
never reach logs, markers, manifests or error rows, the local dashboard is not exposed.

(Unsafe tar member names, links and hard links are refused with error rows and never written outside
the output folder: tests/test_reliability.py::test_every_bad_member_is_an_error_row_with_its_reason...)
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dclip_ray.cli import main
from dclip_ray.errors import InputFileError
from dclip_ray.io.manifest import ManifestRow, manifest_bytes
from dclip_ray.io.shards import write_marker
from dclip_ray.models import load_unet, trust_scope
from dclip_ray.models.trust import TRUST_ENV
from dclip_ray.urls import redact

SECRET = "supersecret"
URL = f"s3://AKIAFAKE:{SECRET}@bucket/x"


class Trap:
    """Unpickling this creates ``path`` (stands in for any code an attacker would run)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def trap_checkpoint(tmp_path, name="trap.ckpt"):
    flag = tmp_path / "pwned"
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Trap(str(flag))}, path)
    return str(path), flag


def test_a_booby_trapped_pickle_is_refused_by_default_and_runs_only_when_trusted(tmp_path):
    path, flag = trap_checkpoint(tmp_path)
    with pytest.raises(InputFileError, match="--trust-checkpoint"):
        load_unet(path, "toy_shapes")
    assert not flag.exists(), "refusing must not execute the payload"
    with trust_scope(True):  # the CLI's --trust-checkpoint: the payload does run (the trap is real)
        with pytest.raises(InputFileError):
            load_unet(path, "toy_shapes")  # its tensors do not fit the preset
    assert flag.exists()
    assert os.environ.get(TRUST_ENV) is None, "the trust scope ends with its block"


@pytest.mark.parametrize("command", ["convert", "precompute", "restyle", "finetune", "edit"])
def test_every_command_refuses_the_trap_with_exit_1(tmp_path, capsys, command):
    path, flag = trap_checkpoint(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    out = str(tmp_path / "out")
    argv = {
        "convert": ["convert", path, "--out", out, "--preset", "toy_shapes"],
        "precompute": ["precompute", "--model", path, "--preset", "toy_shapes", "--input", str(data), "--out", out],
        "restyle": ["restyle", "--input", str(data), "--out", out, "--model", path, "--base", "toy_shapes"],
        "finetune": ["finetune", "--model", path, "--preset", "toy_shapes", "--source", "a", "--target", "b",
                     "--images", str(data), "--out", out],
        "edit": ["edit", "--model", path, "--preset", "toy_shapes", "--finetuned", path, "--images", str(data),
                 "--out", out],
    }[command]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--trust-checkpoint" in err and not flag.exists()


def test_every_model_loading_command_has_the_trust_flag(capsys):
    for command in ("finetune", "edit", "latent-optim", "convert", "precompute", "finetune-many", "restyle"):
        capsys.readouterr()
        assert main([command, "--help"]) == 0
        assert "--trust-checkpoint" in capsys.readouterr().out, command


def test_redact_strips_userinfo_and_secret_query_parameters():
    assert redact(URL) == "s3://***@bucket/x"
    assert redact("https://h.example/a.tar?X-Amz-Signature=abc123&X-Amz-Credential=AKIA%2Fx&v=1") == \
        "https://h.example/a.tar?X-Amz-Signature=***&X-Amz-Credential=***&v=1"
    assert redact("https://acct.blob.core.windows.net/c/x.tar?sv=2020&sig=S3CR3T") == \
        "https://acct.blob.core.windows.net/c/x.tar?sv=2020&sig=***"
    msg = f"error: {URL}/00001.tar: truncated (see gs://u:{SECRET}@b/y)"
    assert SECRET not in redact(msg) and "AKIAFAKE" not in redact(msg)
    assert redact("/work/AKIAFAKE:supersecret@/x.tar") == "/work/***@/x.tar", "a scheme stripped by a library"
    for plain in ("/data/shards/00001.tar", "s3://bucket/x/{00000..00009}.tar", "key=value without a url",
                  "/data/icon@2x.png", "http://host:8080/x"):
        assert redact(plain) == plain


def test_credentials_never_reach_markers_manifests_or_error_messages(tmp_path, capsys):
    write_marker(str(tmp_path / "m_stats.json"), {"source": f"{URL}/00000.tar", "n": 1})
    assert SECRET not in (tmp_path / "m_stats.json").read_text()
    assert json.loads((tmp_path / "m_stats.json").read_text())["source"] == "s3://***@bucket/x/00000.tar"
    row = ManifestRow("k", "00000", "error", error=f"could not read {URL}/00000.tar")
    assert SECRET not in row.error and SECRET.encode() not in manifest_bytes([row])
    # an input URL that cannot be read: the one-line error names it without its secret
    capsys.readouterr()
    assert main(["verify", str(tmp_path), "--input", f"file://AKIAFAKE:{SECRET}@/nonexistent/x.tar"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and SECRET not in err and "AKIAFAKE" not in err


def test_local_ray_dashboard_binds_to_localhost_and_trust_reaches_workers(monkeypatch):
    import ray

    from dclip_ray.pipeline import runtime

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(runtime, "quiet_ray_data", lambda verbose: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.init_ray(num_cpus=2, dashboard=True)
    assert seen["dashboard_host"] == "127.0.0.1" and seen["include_dashboard"] is True
    assert "runtime_env" not in seen
    seen.clear()
    with trust_scope(True):
        runtime.init_ray(num_cpus=2)
    assert seen["runtime_env"] == {"env_vars": {TRUST_ENV: "1"}}


_LISTENERS = r'''
import json, sys, urllib.error, urllib.request
import grpc, psutil, ray
from dclip_ray.pipeline.runtime import init_ray

init_ray(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
ip = ray.nodes()[0]["NodeManagerAddress"]
METHODS = ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
           "/ray.rpc.ObjectManagerService/Push", "/ray.rpc.ReporterService/ReportOCMetrics",
           "/ray.rpc.CoreWorkerService/NumPendingTasks"]
found = []
for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
    for c in proc.net_connections(kind="tcp"):
        if c.status != psutil.CONN_LISTEN or c.laddr.ip in ("127.0.0.1", "::1"):
            continue
        port = c.laddr.port
        try:  # an HTTP server: a job submission path without the token
            http = urllib.request.urlopen(f"http://{ip}:{port}/api/job_agent/jobs/x", timeout=5).status
        except urllib.error.HTTPError as e:
            http = e.code
        except Exception:
            http = None
        codes = []
        if http is None:  # a gRPC server: real Ray methods without the token
            channel = grpc.insecure_channel(f"{ip}:{port}")
            for method in METHODS:
                try:
                    channel.unary_unary(method)(b"", timeout=5)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
        found.append({"process": proc.name(), "addr": c.laddr.ip, "port": port, "http": http, "grpc": codes})
print(json.dumps(found))
'''


def test_embedded_ray_answers_nothing_on_the_network_without_the_token(tmp_path):
    """Issue 30 item 9: Ray 2.60 binds its gRPC servers to every interface (no setting narrows it), so
    every listener an embedded Ray opens beyond loopback must refuse a caller without the token: gRPC
    servers answer UNAUTHENTICATED, HTTP servers 401. Before the fix three Prometheus exporters
    (node, autoscaler, dashboard) answered anyone on 0.0.0.0, and RAY_AUTH_MODE=disabled opened all
    (now refused with one line, exit 1)."""
    import subprocess
    import sys

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_enable_metrics_collection", "AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", _LISTENERS], capture_output=True, text=True, timeout=240,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) >= 4, found  # GCS, raylet, object manager, agents, the workers: all seen
    for f in found:
        if f["http"] is not None:
            assert f["http"] == 401, f
        else:
            assert "OK" not in f["grpc"] and "UNAUTHENTICATED" in f["grpc"], f
            assert set(f["grpc"]) <= {"UNAUTHENTICATED", "UNIMPLEMENTED"}, f



def test_embedded_ray_is_refused_with_token_auth_disabled(monkeypatch):
    import ray

    from dclip_ray.errors import ConfigError
    from dclip_ray.pipeline import runtime

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: started.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE=disabled.*unset RAY_AUTH_MODE"):
        runtime.init_ray(num_cpus=1)
    assert not started
    # a cluster joined with --address keeps its own mode
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(runtime, "quiet_ray_data", lambda verbose: None)
    monkeypatch.setattr(runtime, "quiet_raylet_messages", lambda: None)
    runtime.init_ray(address="ray://10.0.0.1:10001")
    assert started and started[0]["address"] == "ray://10.0.0.1:10001"
