"""Workflow specs, the run ledger, Ray Job submission (no cluster) and the deployment files (fast).

The end-to-end run against a real two-node Ray cluster is tests/test_workflow_cluster.py (slow).
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import ray
import torch
import yaml

from dclip_ray.cli import main
from dclip_ray.errors import AbortedError, ConfigError
from dclip_ray.pipeline import workflow_run as wr
from dclip_ray.workflow import load_spec
from dclip_ray.workflow.ledger import read_ledger
from dclip_ray.workflow.submission import SubmitJob, auth_headers, build_submission, exit_code_of, read_token

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "workflows" / "toy.yaml"

GOOD = {
    "name": "t",
    "input": {"url": "data"},
    "model": "toy_shapes",
    "prompts": ["red circle -> blue circle name=blue", "red circle -> green circle name=green"],
    "finetune": {"epochs": 1},
    "outputs": {"root": "out"},
}


def write_spec(folder: Path, raw: dict | str, name: str = "spec.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return p


def merged(**changes) -> dict:
    raw = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


# -- specs -------------------------------------------------------------------------------------------------
def test_toy_spec_loads_with_paths_resolved_against_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo: relative paths must follow the spec file
    s = load_spec(str(TOY))
    assert s.name == "toy" and s.model == "toy_shapes", "a preset name is not taken for a path"
    assert s.outputs.root == str(ROOT / "toy-out")
    assert s.input.toyworld is not None and (s.input.toyworld.n, s.input.toyworld.shard_size) == (64, 32)
    assert s.input_url == str(ROOT / "toy-out" / "input")
    assert s.latent_store == str(ROOT / "toy-out" / "latents") and s.ledger == str(ROOT / "toy-out" / "runs.jsonl")
    assert s.restyle.variants == ["blue"] and s.finetune.n_train == 16 and s.latents.t0 == 500
    assert s.input.toyworld.kind_pairs() == [("red", "circle"), ("green", "square")]


def test_relative_paths_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "p.txt").write_text("red circle -> blue circle name=blue\n")
    raw = merged(prompts="p.txt", outputs__root="../out", finetune__clip_weights="w/clip.safetensors",
                 model="./models/base")
    spec = write_spec(tmp_path / "specs", raw)
    monkeypatch.chdir(ROOT)
    s = load_spec(spec, ["finetune.epochs=3", "restyle.n_gen=7", "ray.address=ray://head:10001"])
    assert s.prompts.file == str(tmp_path / "specs" / "p.txt")
    assert s.outputs.root == str(tmp_path / "out") and s.input.url == str(tmp_path / "specs" / "data")
    assert s.finetune.clip_weights == str(tmp_path / "specs" / "w" / "clip.safetensors")
    assert s.model == str(tmp_path / "specs" / "models" / "base")
    assert (s.finetune.epochs, s.restyle.n_gen, s.ray.address) == (3, 7, "ray://head:10001")


BAD = [
    (dict(finetune__epochs=0), "finetune.epochs: must be >= 1 (got 0)"),
    (dict(finetun={"epochs": 1}), "finetun: unknown field; did you mean 'finetune'?"),
    (dict(restyle={"strenght": 0.5}), "restyle.strenght: unknown field; did you mean 'strength'?"),
    (dict(restyle={"strength": 1.5}), "restyle.strength: must be <= 1 (got 1.5)"),
    (dict(latents={"t0": 1000}), "latents.t0: must be <= 999 (got 1000)"),
    (dict(latents={"dtype": "bf16"}), "latents.dtype: must be one of 'float32' or 'float16' (got 'bf16')"),
    (dict(restyle={"format": "gif"}), "restyle.format: must be one of 'png', 'jpg' or 'webp'"),
    (dict(finetune__lr="fast"), "finetune.lr: must be a number (got 'fast')"),
    (dict(outputs=...), "outputs: required field is missing"),
    (dict(input={"url": "d", "toyworld": {"n": 4}}), "input: give exactly one of input.url"),
    (dict(input={"toyworld": {"n": 0}}), "input.toyworld.n: must be >= 1 (got 0)"),
    (dict(prompts=["red circle blue circle"]), "prompts.lines[0]: missing '->'"),
    (dict(prompts="nope.txt"), "prompts.file: "),
    (dict(restyle={"variants": ["red"]}), "restyle.variants[0]: 'red' is not a prompt name"),
    (dict(restyle={"variants": ["blue"], "mix": {"models": ["blue"], "gamma": {"type": "constant", "weights": [1]}}}),
     "restyle: give either restyle.variants or restyle.mix, not both"),
    (dict(restyle={"mix": {"models": ["blue", "green"], "gamma": {"type": "wobble"}}}), "restyle.mix.gamma: gamma.type='wobble'"),
    (dict(restyle={"mix": {"models": ["blue", "green"], "gamma": {"type": "constant", "weights": [0.5, 0.3]}}}),
     "restyle.mix.gamma: gamma weights at step t=0 sum to 0.8, not 1"),
    (dict(name="nightly run"), "name: must be letters, digits"),
    (dict(ray={"gpus_per_task": -1}), "ray.gpus_per_task: must be >= 0 (got -1)"),
]


@pytest.mark.parametrize("changes,expected", BAD, ids=[e.split(":")[0] for _, e in BAD])
def test_bad_spec_one_line_naming_the_field(tmp_path, capsys, changes, expected):
    spec = write_spec(tmp_path, merged(**changes))
    capsys.readouterr()
    assert main(["run", str(spec)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: workflow spec {spec}: "), err[0]
    assert expected in err[0], err[0]
    assert not (tmp_path / "out").exists(), "nothing started"


def test_unreadable_specs(tmp_path, capsys):
    bad_yaml = write_spec(tmp_path, "name: t\ninput: {url: [\n")
    assert main(["run", str(bad_yaml)]) == 1
    assert "line 3, column 1: not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml not found" in capsys.readouterr().err
    assert main(["run", str(write_spec(tmp_path, "- a list\n", "l.yaml"))]) == 1
    assert "expected a mapping" in capsys.readouterr().err
    spec = write_spec(tmp_path, GOOD, "g.yaml")
    assert main(["run", str(spec), "--set", "finetune.epochs"]) == 1
    assert "--set 'finetune.epochs': expected FIELD.PATH=VALUE" in capsys.readouterr().err


def test_check_prints_the_resolved_spec(tmp_path, capsys):
    spec = write_spec(tmp_path, GOOD)
    (tmp_path / "data").mkdir()  # --check makes the run's own checks: a missing input.url is an error
    capsys.readouterr()
    assert main(["run", str(spec), "--check", "--set", "finetune.epochs=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finetune"]["epochs"] == 4 and out["resolved"]["ledger"] == str(tmp_path / "out" / "runs.jsonl")
    assert out["resolved"]["restyled"] == str(tmp_path / "out" / "restyled")


# -- the runner (steps replaced by fakes: the orchestration and the ledger are under test) -------------------
@pytest.fixture
def fake_steps(monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()  # GOOD's input.url (the run checks local paths first)
    calls: list[str] = []
    state = {"pre_errors": 0, "ft_failed": set(), "restyle_raises": None, "processed": 2}

    def pre(spec, verbose, progress):
        calls.append("precompute")
        n = state["processed"]
        return {"shards": 2, "processed": n, "skipped": 2 - n, "images": 8 * n, "errors": state["pre_errors"]}

    def ft(spec, verbose, progress):
        calls.append("finetune")
        models = {n: {"status": "failed" if n in state["ft_failed"] else ("ok" if state["processed"] else "skipped (done)")}
                  for n in ("blue", "green")}
        return {"prompts": 2, "trained": sum(m["status"] == "ok" for m in models.values()),
                "skipped": sum(m["status"].startswith("skipped") for m in models.values()),
                "failed": len(state["ft_failed"]), "models": models}

    def rs(spec, ok_models, verbose, progress):
        calls.append(f"restyle:{','.join(sorted(ok_models))}")
        if state["restyle_raises"]:
            raise state["restyle_raises"]
        return {"shards": 2, "processed": state["processed"], "skipped": 2 - state["processed"], "images": 16, "errors": 0}

    def ver(spec, ok_models):
        calls.append("verify")
        return {"ok": True, "keys": 16, "problems": 0}

    monkeypatch.setattr(wr, "_step_precompute", pre)
    monkeypatch.setattr(wr, "_step_finetune", ft)
    monkeypatch.setattr(wr, "_step_restyle", rs)
    monkeypatch.setattr(wr, "_step_verify", ver)
    monkeypatch.setattr(wr, "init_ray", lambda *a, **k: {"CPU": 2.0})  # the fake steps need no Ray
    monkeypatch.setitem(sys.modules, "dclip_ray.evaluation.report", None)  # "not available"
    return calls, state


def test_run_records_every_step_in_order_and_appends_to_the_ledger(tmp_path, fake_steps):
    calls, state = fake_steps
    spec = load_spec(write_spec(tmp_path, GOOD))
    r1 = wr.run_workflow(spec, progress=False)
    assert calls == ["precompute", "finetune", "restyle:blue,green", "verify"]
    assert r1["status"] == "ok" and r1["exit_code"] == 0
    assert r1["steps"]["precompute"]["processed"] == 2 and r1["steps"]["finetune"]["trained"] == 2
    assert r1["steps"]["report"]["status"] == "skipped (not available)"
    state["processed"] = 0
    r2 = wr.run_workflow(spec, progress=False)
    ledger = read_ledger(spec.ledger)
    assert [r["run_id"] for r in ledger] == [r1["run_id"], r2["run_id"]] and r1["run_id"] != r2["run_id"]
    assert ledger[1]["steps"]["precompute"]["processed"] == 0 and ledger[1]["steps"]["finetune"]["skipped"] == 2
    assert ledger[1]["steps"]["restyle"]["processed"] == 0
    assert ledger[0]["start"] <= ledger[0]["end"] <= ledger[1]["start"]
    assert (tmp_path / "out" / "runs.jsonl").read_text().count("\n") == 2


def test_run_exit_codes_item_errors_failed_prompt_and_abort(tmp_path, fake_steps):
    calls, state = fake_steps
    spec = load_spec(write_spec(tmp_path, GOOD))
    state["pre_errors"] = 3
    r = wr.run_workflow(spec, progress=False)
    assert (r["exit_code"], r["status"]) == (2, "finished_with_errors")
    state["pre_errors"], state["ft_failed"] = 0, {"green"}
    calls.clear()
    r = wr.run_workflow(spec, progress=False)
    assert (r["exit_code"], r["status"]) == (3, "aborted")
    assert "restyle:blue" in calls, "the prompts that trained are still restyled"
    state["ft_failed"], state["restyle_raises"] = set(), AbortedError("1 shard(s) failed")
    with pytest.raises(AbortedError):
        wr.run_workflow(spec, progress=False)
    last = read_ledger(spec.ledger)[-1]
    assert (last["exit_code"], last["status"], last["error"]) == (3, "aborted", "1 shard(s) failed")
    assert last["steps"]["restyle"]["status"].startswith("failed: 1 shard(s) failed")
    assert "verify" not in last["steps"]
    state["restyle_raises"] = ConfigError("bad model")
    with pytest.raises(ConfigError):
        wr.run_workflow(spec, progress=False)
    assert read_ledger(spec.ledger)[-1]["exit_code"] == 1
    assert len(read_ledger(spec.ledger)) == 4


def test_missing_local_paths_stop_the_run_before_any_step(tmp_path, fake_steps):
    calls, _ = fake_steps
    spec = load_spec(write_spec(tmp_path, merged(model="./base", finetune__clip_weights="/no/such/clip.safetensors")))
    with pytest.raises(ConfigError, match=r"model: .*/base not found on this machine"):
        wr.run_workflow(spec, progress=False)
    (tmp_path / "base").mkdir()
    with pytest.raises(ConfigError, match="finetune.clip_weights: /no/such/clip.safetensors not found"):
        wr.run_workflow(spec, progress=False)
    assert calls == [] and [r["exit_code"] for r in read_ledger(spec.ledger)] == [1, 1]
    assert read_ledger(spec.ledger)[0]["status"] == "config_error"


def test_report_step_calls_write_report_when_available(tmp_path, fake_steps, monkeypatch):
    seen = []
    fake = types.ModuleType("dclip_ray.evaluation.report")
    fake.write_report = lambda run_dir, config: seen.append((run_dir, config)) or f"{run_dir}/report.html"
    monkeypatch.setitem(sys.modules, "dclip_ray.evaluation.report", fake)
    spec = load_spec(write_spec(tmp_path, GOOD))
    r = wr.run_workflow(spec, progress=False)
    assert [d for d, _ in seen] == [str(tmp_path / "out")]
    assert seen[0][1]["workflow spec (as run, paths resolved)"]["name"] == spec.name  # the spec is in the report
    assert r["steps"]["report"] == {"status": "ok", "path": f"{tmp_path}/out/report.html", "seconds": pytest.approx(0, abs=1)}

    def broken(run_dir, config):
        raise RuntimeError("no metrics")

    fake.write_report = broken
    r = wr.run_workflow(spec, progress=False)
    assert r["exit_code"] == 2 and r["steps"]["report"]["status"] == "failed: RuntimeError: no metrics"


def test_restyle_layout_never_changes_with_the_number_of_variants(tmp_path):
    spec = load_spec(write_spec(tmp_path, GOOD))
    out, models, mix, left = wr.restyle_plan(spec, {"blue", "green"})
    assert out == str(tmp_path / "out" / "restyled") and mix is None and left == []
    assert models == [str(tmp_path / "out" / "models" / n) for n in ("blue", "green")]  # -> restyled/{name} each
    out, models, _, left = wr.restyle_plan(spec, {"blue"})
    assert out == str(tmp_path / "out" / "restyled") and left == ["green"]  # -> restyled/blue, as with two
    mixed = load_spec(write_spec(tmp_path, merged(restyle={"mix": {"models": ["blue", "green"],
                                                                   "gamma": {"type": "constant", "weights": [0.5, 0.5]}}})))
    out, models, mix, left = wr.restyle_plan(mixed, {"blue", "green"})
    assert out.endswith("restyled") and models is None and mix["gamma"]["weights"] == [0.5, 0.5]  # -> restyled/mix
    assert mix["models"][1] == str(tmp_path / "out" / "models" / "green")
    assert wr.restyle_plan(mixed, {"blue"})[2:] == (None, ["green"])


def test_toyworld_input_is_rendered_once(tmp_path):
    spec = load_spec(write_spec(tmp_path, merged(input={"toyworld": {"n": 6, "shard_size": 4}})))
    assert wr.ensure_toyworld_input(spec) == 2
    first = (tmp_path / "out" / "input" / "00001.tar").read_bytes()
    assert wr.ensure_toyworld_input(spec) == 0
    assert (tmp_path / "out" / "input" / "00001.tar").read_bytes() == first


# -- submit (no cluster) -----------------------------------------------------------------------------------
def test_submission_entrypoint_runtime_env_and_excludes(monkeypatch):
    monkeypatch.chdir(ROOT)
    warnings = []
    sub = build_submission(SubmitJob(spec="workflows/toy.yaml", address="http://h:8265",
                                     overrides=["outputs.root=/shared/x y"]), warn=warnings.append)
    assert sub["entrypoint"] == "dclip-ray run workflows/toy.yaml --set 'outputs.root=/shared/x y'"
    assert sub["runtime_env"]["working_dir"] == str(ROOT) and ".venv" in sub["runtime_env"]["excludes"]
    assert warnings == []
    sub = build_submission(SubmitJob(spec="workflows/toy.yaml", address="http://h:8265"), warn=warnings.append)
    assert "/toy-out" in sub["runtime_env"]["excludes"]
    assert len(warnings) == 1 and "temporary copy" in warnings[0], "outputs inside the uploaded folder are lost"
    sub = build_submission(SubmitJob(spec="workflows/nightly-restyle.yaml", address="x", upload=False))
    assert "working_dir" not in sub["runtime_env"] and sub["entrypoint"] == "dclip-ray run workflows/nightly-restyle.yaml"


def test_submission_refuses_a_spec_outside_the_working_dir(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, GOOD)
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="outside the working dir"):
        build_submission(SubmitJob(spec=str(spec), address="x"))


def test_token_sources_in_order_and_never_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert read_token() is None and auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert read_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert read_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_headers() == {"Authorization": "Bearer from-env"}
    (tmp_path / "f").write_text("from-file")
    assert read_token(str(tmp_path / "f")) == "from-file"
    # an unreachable dashboard: one error line, exit 1, and the token is not in it
    write_spec(tmp_path, GOOD)
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "spec.yaml", "--address", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "error: cannot reach the Ray dashboard at http://127.0.0.1:9" in err and "from-env" not in err


def test_exit_codes_of_job_states():
    assert exit_code_of("SUCCEEDED", 0) == 0
    assert exit_code_of("FAILED", 2) == 2 and exit_code_of("FAILED", None) == 1
    assert exit_code_of("STOPPED", None) == 3


def test_submit_validates_the_spec_before_contacting_anything(tmp_path, capsys):
    spec = write_spec(tmp_path, merged(finetune__epochs=0))
    assert main(["submit", str(spec), "--address", "http://127.0.0.1:9"]) == 1
    assert "finetune.epochs: must be >= 1" in capsys.readouterr().err


# -- deployment files --------------------------------------------------------------------------------------
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_cron(expr: str) -> bool:
    """A standard 5-field cron expression (numbers, *, ranges, steps, lists)."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, CRON_RANGES, strict=True):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m:
                return False
            a, b, step = m.group(2), m.group(3), m.group(4)
            if a is not None and not (lo <= int(a) <= hi and (b is None or int(a) <= int(b) <= hi)):
                return False
            if step is not None and int(step) < 1:
                return False
    return True


def check_containers(containers: list, where: str, gpu: bool) -> None:
    assert containers, f"{where}: no container"
    c = containers[0]
    assert "dclip-ray" in c["image"], f"{where}: image {c['image']} is not the project's"
    if gpu:
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert int(req["nvidia.com/gpu"]) >= 1 and req["nvidia.com/gpu"] == lim["nvidia.com/gpu"], f"{where}: GPU request"


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion {spec['rayVersion']} != {ray.__version__}"
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication off"
    check_containers(spec["headGroupSpec"]["template"]["spec"]["containers"], f"{where}.head", gpu=False)
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}.{g['groupName']}: replica bounds"
        check_containers(g["template"]["spec"]["containers"], f"{where}.{g['groupName']}", gpu=True)


def check_rayjob_spec(spec: dict, where: str) -> None:
    m = re.search(r"dclip-ray run (workflows/[\w.-]+\.yaml)", spec["entrypoint"])
    assert m, f"{where}: entrypoint {spec['entrypoint']!r} does not run `dclip-ray run workflows/...`"
    assert (ROOT / m.group(1)).is_file(), f"{where}: {m.group(1)} is not in the repo"
    load_spec(ROOT / m.group(1))
    assert spec["shutdownAfterJobFinishes"] is True, f"{where}: the cluster would outlive the job"
    check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")


def check_k8s(doc: dict, where: str, docs: list[dict]) -> None:
    kind = doc["kind"]
    if kind in ("RayCluster", "RayJob", "RayCronJob"):
        assert doc["apiVersion"] == "ray.io/v1", where
    if kind == "RayCluster":
        check_ray_cluster_spec(doc["spec"], where)
    elif kind == "RayJob":
        check_rayjob_spec(doc["spec"], where)
    elif kind == "RayCronJob":
        assert valid_cron(doc["spec"]["schedule"]), f"{where}: schedule {doc['spec']['schedule']!r}"
        check_rayjob_spec(doc["spec"]["jobTemplate"], f"{where}.jobTemplate")
    elif kind == "ConfigMap":
        for name, text in doc["data"].items():
            inner = yaml.safe_load(text)
            check_k8s(inner, f"{where}.data.{name}", docs)
    elif kind == "CronJob":
        assert doc["apiVersion"] == "batch/v1"
        spec = doc["spec"]
        assert valid_cron(spec["schedule"]) and spec["concurrencyPolicy"] == "Forbid", where
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        script = " ".join(pod["containers"][0]["args"])
        assert "kubectl create -f /config/rayjob.yaml" in script, f"{where}: does not create the RayJob"
        sa = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
        maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
        assert pod["serviceAccountName"] in sa, f"{where}: service account not defined"
        assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} <= maps
    elif kind == "Role":
        assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in doc["rules"]), where


def check_launcher(doc: dict, where: str) -> None:
    assert doc["provider"]["type"] in ("aws", "gcp"), where
    assert "dclip-ray" in doc["docker"]["image"], f"{where}: image"
    assert "-e RAY_AUTH_MODE=token" in doc["docker"]["run_options"], f"{where}: token auth"
    types_ = doc["available_node_types"]
    assert doc["head_node_type"] in types_, f"{where}: head_node_type"
    gpu_groups = 0
    for name, t in types_.items():
        if name == doc["head_node_type"]:
            continue
        assert 0 <= t["min_workers"] <= t["max_workers"] <= doc["max_workers"], f"{where}.{name}: worker bounds"
        gpu_groups += t["resources"].get("GPU", 0) >= 1
    assert gpu_groups >= 1, f"{where}: no GPU worker group"
    assert any("--head" in c and "--dashboard-host=0.0.0.0" in c for c in doc["head_start_ray_commands"])
    assert any(re.search(r"ray start --address=\$RAY_HEAD_IP:6379", c) for c in doc["worker_start_ray_commands"])


def check_yaml_file(path: Path) -> list[str]:
    """Parse every document of ``path`` and check it; returns the kinds checked."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: empty"
    kinds = []
    for i, doc in enumerate(docs):
        where = f"{path.relative_to(ROOT)}[{i}]"
        if "provider" in doc:
            check_launcher(doc, where)
            kinds.append("launcher")
        else:
            check_k8s(doc, where, docs)
            kinds.append(doc["kind"])
    return kinds


DEPLOY_FILES = sorted((ROOT / "cluster").rglob("*.yaml"))


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=[str(p.relative_to(ROOT)) for p in DEPLOY_FILES])
def test_deployment_file_parses_and_has_the_fields_that_matter(path):
    check_yaml_file(path)


def test_every_deployment_kind_is_there():
    kinds = [k for p in DEPLOY_FILES for k in check_yaml_file(p)]
    for k in ("launcher", "RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap", "Role"):
        assert k in kinds, k
    assert kinds.count("launcher") == 2


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_every_workflow_spec_validates(path):
    assert load_spec(path).name == path.stem


def test_the_checkers_reject_broken_manifests():
    assert valid_cron("0 2 * * *") and valid_cron("*/15 0-6,22 1 * 1-5")
    for bad in ("0 2 * *", "60 2 * * *", "0 2 * * mon-fri", "0 24 * * *", "*/0 * * * *"):
        assert not valid_cron(bad), bad
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    broken = json.loads(json.dumps(job))
    broken["spec"]["entrypoint"] = "python run.py"
    with pytest.raises(AssertionError, match="does not run"):
        check_k8s(broken, "x", [broken])
    broken = json.loads(json.dumps(job))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    with pytest.raises(AssertionError, match="replica bounds"):
        check_k8s(broken, "x", [broken])
    launcher = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    launcher["available_node_types"]["gpu_worker"]["resources"].pop("GPU")
    with pytest.raises(AssertionError, match="no GPU worker group"):
        check_launcher(launcher, "x")


def test_dockerfile_matches_the_installed_ray_python_and_torch():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert froms == [f"rayproject/ray:{ray.__version__}-{py}-gpu"], froms
    torch_version = torch.__version__.split("+")[0]
    assert f"torch=={torch_version}" in text, "the image must pin the torch the project is tested with"
    assert re.search(r"^RUN pip install \.", text, flags=re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
