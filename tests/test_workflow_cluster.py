"""`dclip-ray submit workflows/toy.yaml` against a real two-node Ray cluster on loopback (slow: ~6 min on 2 CPUs).

The test starts a head (`ray start --head --block`, 1 CPU) and a second node (`ray start --block
--address=...`, 4 logical CPUs on this 2-core machine) with token authentication on (`RAY_AUTH_MODE=token`, the token in a file of
the test's own, passed as `RAY_AUTH_TOKEN_PATH`), every port chosen free, the dashboard on 127.0.0.1,
and a temp dir of its own; it never calls `ray stop` (that would stop every Ray on the machine). Each
`ray start --block` runs in a new session; the finalizer terminates both and then kills, by pid, any
process left in those two sessions.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dclip_ray.stages.verify import verify
from dclip_ray.workflow.ledger import read_ledger

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (field 6 of /proc/PID/stat)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d))
    return out


def stop_sessions(procs: list[subprocess.Popen]) -> list[int]:
    """SIGTERM each `ray start --block` (it stops its node), wait, then SIGKILL what is left of their
    sessions, by pid, until nothing is left (a killed process takes a moment to go). Returns the pids
    that had to be killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 15
    while time.time() < deadline and any(session_pids(p.pid) for p in procs):
        time.sleep(0.5)
    killed: list[int] = []
    deadline = time.time() + 20
    while time.time() < deadline:
        left = [pid for p in procs for pid in session_pids(p.pid)]
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    return killed


def wait_dashboard(port: int, timeout: float = 120) -> None:
    start = time.time()
    while time.time() - start < timeout:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard on port {port} did not come up in {timeout} s")


def node_ports() -> list[str]:
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="dcr", dir="/tmp")  # short: Ray's socket paths live under it
    token = Path(tmp) / "token"
    token.write_text(secrets.token_hex(16))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # each node its own temp dir: on one host a shared one would share the unpacked working_dir too, and the
    # worker node's runtime-env agent deleting it when its tasks end would pull the job driver's cwd away
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=1", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}", f"--temp-dir={tmp}/ray", *common,
             *node_ports()],
            env=env, start_new_session=True, stdout=open(f"{tmp}/head.log", "w"), stderr=subprocess.STDOUT))
        wait_dashboard(dash)
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=4", f"--temp-dir={tmp}/rw", *common,
             *node_ports()],
            env=env, start_new_session=True, stdout=open(f"{tmp}/worker.log", "w"), stderr=subprocess.STDOUT))
        start = time.time()
        while time.time() - start < 90:
            st = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{gcs}"], env=env, capture_output=True,
                                text=True)
            if "0.0/5.0 CPU" in st.stdout:
                break
            time.sleep(2)
        else:
            raise TimeoutError(f"the second node did not join: {st.stdout[-500:]} {st.stderr[-500:]}")
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "env": env, "tmp": tmp,
               "procs": procs}
    finally:
        try:
            stop_sessions(procs)
            assert not [pid for p in procs for pid in session_pids(p.pid)], "a Ray process outlived the test"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def dclip(args: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dclip-ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_toy_spec_twice_on_two_nodes(cluster, tmp_path):
    env, address = cluster["env"], cluster["address"]
    out = tmp_path / "toy-out"
    # the mechanics of submitting, not edit quality: one epoch, its model kept whatever its check says
    args = ["submit", "workflows/toy.yaml", "--address", address, "--set", f"outputs.root={out}", "--set",
            "finetune.epochs=1", "--set", "finetune.accept_low_quality=true", "--json"]
    t = time.perf_counter()
    first = dclip(args, env)
    first_s = time.perf_counter() - t
    assert first.returncode == 0, first.stderr[-3000:]
    r1 = json.loads(first.stdout)
    assert r1["status"] == "SUCCEEDED" and r1["exit_code"] == 0
    assert "[verify] ok" in first.stderr, "the job's log is followed"
    report = verify(str(out / "restyled"), str(out / "input"))
    assert report.ok, report.problems[:5]
    assert sum(s["n_ok"] for s in report.shards) == 64 and len(report.shards) == 2

    t = time.perf_counter()
    second = dclip(args, env)
    second_s = time.perf_counter() - t
    assert second.returncode == 0, second.stderr[-3000:]
    ledger = read_ledger(str(out / "runs.jsonl"))
    assert [r["exit_code"] for r in ledger] == [0, 0]
    a, b = ledger[0]["steps"], ledger[1]["steps"]
    assert (a["precompute"]["processed"], a["finetune"]["trained"], a["restyle"]["processed"]) == (2, 1, 2)
    assert (b["precompute"]["processed"], b["finetune"]["trained"], b["restyle"]["processed"]) == (0, 0, 0), b
    assert (b["precompute"]["skipped"], b["finetune"]["skipped"], b["restyle"]["skipped"]) == (2, 1, 2)
    assert b["verify"]["ok"] is True and b["verify"]["keys"] == 64

    # a new input shard (the toy world rendered with 96 images: shards 00000-00001 are byte-identical,
    # 00002 is new): only it is inverted and restyled, the model is not retrained
    t = time.perf_counter()
    third = dclip(args + ["--set", "input.toyworld.n=96"], env)
    third_s = time.perf_counter() - t
    assert third.returncode == 0, third.stderr[-3000:]
    c = read_ledger(str(out / "runs.jsonl"))[2]["steps"]
    assert (c["precompute"]["processed"], c["finetune"]["trained"], c["restyle"]["processed"]) == (1, 0, 1), c
    assert (c["precompute"]["skipped"], c["restyle"]["skipped"], c["verify"]["keys"]) == (2, 2, 96)
    assert verify(str(out / "restyled"), str(out / "input")).ok
    print(f"\nfirst run {first_s:.0f} s, second run {second_s:.0f} s (nothing new), third {third_s:.0f} s (1 new shard)")

    status = dclip(["status", r1["job_id"], "--address", address, "--json"], env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"


def test_submit_without_the_token_is_refused_in_one_line(cluster, tmp_path):
    env = {k: v for k, v in cluster["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    res = dclip(["submit", "workflows/toy.yaml", "--address", cluster["address"], "--set",
                 f"outputs.root={tmp_path}/o"], env, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "requires token authentication and no token was found" in lines[0], res.stderr[-2000:]
    bad = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    res = dclip(["status", "raysubmit_x", "--address", cluster["address"]], bad, timeout=120)
    assert res.returncode == 1 and "the token sent was refused" in res.stderr and "not-the-token" not in res.stderr


def max_overlap(rows: list[dict]) -> int:
    """The most shards in work at the same moment, from each shard row's ``started`` and ``seconds``."""
    ends = sorted([(r["started"], 1) for r in rows if r.get("started")]
                  + [(r["started"] + r["seconds"], -1) for r in rows if r.get("started")])
    most = now = 0
    for _, step in ends:
        now += step
        most = max(most, now)
    return most


def test_restyle_at_an_address_sizes_its_pool_from_the_cluster_not_the_driver(cluster, tmp_path):
    """The driver machine has 2 cores; the cluster has 5 CPUs (a 1-CPU head, a 4-CPU worker): `restyle
    --address` (and its dry run) sizes the pool from the cluster, 5 actors that may grow to one per shard,
    and runs more shards at once than the driver has cores, on both nodes; every key is restyled once.
    48 shards: the worker node's actors take about a minute to start beside the head's busy ones on these
    2 cores (with 10 shards the head's 2 actors had finished everything first)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_fixtures import tiny_models

    from dclip_ray.toyworld.data import write_shards

    data = tmp_path / "data"
    write_shards(str(data), 384, seed=0, shard_size=8)  # 48 shards
    models = tiny_models(tmp_path / "m", 300)
    args = ["restyle", "--input", str(data), "--model", models["ft"], "--out", str(tmp_path / "out"),
            "--address", cluster["gcs"], "--n-inv", "40", "--n-gen", "40", "--json"]
    plan = dclip([*args, "--dry-run"], cluster["env"], timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    planned = json.loads(plan.stdout)["pool"]
    assert (planned["actors"], planned["max_actors"]) == (5, 48), "the dry run sizes the pool from the cluster"
    run = dclip(args, cluster["env"], timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads(run.stdout)
    pool = s["pool"]
    assert pool["actors"] == 5 and pool["cluster_cpus"] == 5 and "cluster's 5" in pool["why"], pool
    assert pool["max_actors"] == 48 and "may grow to 48" in pool["why"], pool
    at_once = max_overlap(s["shards"])
    assert at_once > min(os.cpu_count() or 1, 4), f"only {at_once} shard(s) ran at once on a 5-CPU cluster: {pool}"
    assert pool["nodes_ran"] == 2 and pool["actors_ran"] >= 3, pool
    assert s["n_images"] == 384 and verify(str(tmp_path / "out"), str(data)).ok
