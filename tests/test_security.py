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
