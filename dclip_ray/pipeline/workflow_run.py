"""`dclip-ray run SPEC`: precompute -> finetune-many -> restyle -> verify -> report, in order, incrementally.

Each step is the library function its own command calls (:func:`run_precompute`,
:func:`run_finetune_many`, :func:`run_restyle`, :func:`verify`), and each already skips committed work:
latent shards with a commit marker, models whose card carries the same configuration hash, output
shards with a commit marker. So the same spec can run every night and only new input shards are
processed. Every run appends one JSON line to the run ledger (``outputs.root/runs.jsonl`` by default):
run id, start, end, per-step counts, status and exit code; a run that stops on an error is recorded
too before the error reaches the caller.

Exit codes (DESIGN contract): 0 all done; 1 configuration error; 2 finished with per-item errors
(bad images, verify problems, a failed report); 3 aborted (a prompt failed to train or a shard
failed: re-run the same spec to resume).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import fsspec

from dclip_ray.errors import EXIT_ABORTED, EXIT_ITEM_ERRORS, EXIT_OK, ConfigError, DclipError, Interrupted
from dclip_ray.urls import is_remote, is_url, local_path, redact_data
from dclip_ray.workflow.spec import WorkflowSpec

STATUS_OF_CODE = {0: "ok", 1: "config_error", 2: "finished_with_errors", 3: "aborted"}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_ledger(ledger: str, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``ledger`` (local path or fsspec URL; remote files are
    rewritten whole since object stores cannot append)."""
    line = json.dumps(redact_data(record), default=str, sort_keys=False) + "\n"  # no secret of a URL
    fs, path = fsspec.core.url_to_fs(ledger)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
        return
    old = fs.cat_file(path) if fs.exists(path) else b""
    fs.pipe_file(path, old + line.encode())


def read_ledger(ledger: str) -> list[dict[str, Any]]:
    """All run records of a ledger, oldest first (``[]`` when there is none yet)."""
    try:
        with fsspec.open(ledger, "rt", encoding="utf-8") as f:
            return [json.loads(ln) for ln in f if ln.strip()]
    except FileNotFoundError:
        return []


def ensure_toyworld_input(spec: WorkflowSpec) -> int:
    """Render the toy-world input under ``spec.input_url`` if a shard of it is missing; returns the
    number of shards written (0 when all were there: the render is deterministic)."""
    tw = spec.input.toyworld
    if tw is None:
        return 0
    from dclip_ray.toyworld.data import write_shards

    fs, root = fsspec.core.url_to_fs(spec.input_url)
    names = [f"{i:05d}.tar" for i in range((tw.n + tw.shard_size - 1) // tw.shard_size)]
    if all(fs.exists(f"{root.rstrip('/')}/{n}") for n in names):
        return 0
    # the render is deterministic: shards already there are rewritten byte for byte (their fingerprints,
    # and so their committed work, stay), the missing ones are added
    return len(write_shards(spec.input_url, tw.n, seed=tw.seed, shard_size=tw.shard_size, kinds=tw.kind_pairs(),
                            overwrite=True))


def preflight(spec: WorkflowSpec) -> None:
    """Fail before any work (and before Ray starts) when a local path the run needs is missing.

    Checked here, on the machine that runs the spec, not at load time: a spec submitted from a laptop
    names paths of the cluster. Raises :class:`ConfigError` naming the spec field."""
    where = spec.source or spec.name
    needed = [("model", spec.model), ("finetune.clip_weights", spec.finetune.clip_weights)]
    if spec.input.url is not None:
        needed.append(("input.url", spec.input.url))
    for field, value in needed:
        if not value or is_remote(value):
            continue
        path = local_path(value)
        if os.path.isabs(path) and not any(c in path for c in "*?{[") and not os.path.exists(path):
            raise ConfigError(f"workflow spec {where}: {field}: {path} not found on this machine; fix the path "
                              "(relative paths resolve against the spec's folder)")
    _check_locations(spec)
    _check_names(spec, where)
    from .runtime import check_local_ray

    try:
        check_local_ray(spec.ray.address)  # every run starts Ray
    except ConfigError as e:
        raise ConfigError(f"workflow spec {where}: {e}") from None


def _check_names(spec: WorkflowSpec, where: str) -> None:
    """The model and CLIP names resolve (a preset, a path, a URL, or an open_clip model name) and the
    input URL holds shards: existence only, no weights are loaded. Raises :class:`ConfigError`."""
    import difflib

    from dclip_ray.models.presets import list_presets

    presets = list_presets()
    named = [("model", spec.model, presets)]
    if spec.finetune.clip:
        named.append(("finetune.clip", spec.finetune.clip, list_presets("clip")))
    for field, value, choices in named:
        if value in presets or is_url(value) or os.sep in value or "/" in value or os.path.exists(value):
            continue
        if field == "finetune.clip":
            import open_clip

            if value in open_clip.list_models():
                continue
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"workflow spec {where}: {field}: {value!r} is no preset and no path; {hint}the presets are "
                          f"{', '.join(choices)} (`dclip-ray models list`)")
    if spec.input.url is not None:
        from dclip_ray.errors import InputFileError
        from dclip_ray.stages.inputs import input_shards

        try:
            input_shards(spec.input.url)  # a glob or URL that lists nothing, an unreachable bucket
        except (InputFileError, ConfigError) as e:
            raise ConfigError(f"workflow spec {where}: input.url: {e}") from None


def _check_locations(spec: WorkflowSpec, ledger_only: bool = False) -> None:
    """No step writes where a step reads: latents, models and restyled outputs apart from the input, the
    base model and each other (raises :class:`ConfigError` naming the spec fields). ``ledger_only``:
    only the ledger's place (checked before the run writes its record there)."""
    from dclip_ray.io.locations import check_outputs

    where = spec.source or spec.name
    given_input = {"input.url": spec.input.url} if spec.input.url else {}
    read = {**given_input, "model": spec.model, "prompts.file": spec.prompts.file,
            "latents store": spec.latent_store, "models folder": spec.models_dir, "restyled folder": spec.restyled_dir}
    try:
        # the files a run writes beside its folders: never inside (or onto) what any step reads
        check_outputs({"outputs.ledger": spec.ledger}, read)
        if ledger_only:
            return
        if spec.outputs.report:
            check_outputs({"the report": os.path.join(spec.outputs.root, "report.html")}, {**given_input,
                                                                                        "model": spec.model})
        check_outputs({"latents store": spec.latent_store}, {**given_input, "model": spec.model})
        check_outputs({"models folder": spec.models_dir}, {**given_input, "model": spec.model,
                                                           "latents store": spec.latent_store})
        check_outputs({"restyled folder": spec.restyled_dir}, {**given_input, "model": spec.model,
                                                               "latents store": spec.latent_store,
                                                               "models folder": spec.models_dir})
    except ConfigError as e:
        raise ConfigError(f"workflow spec {where}: {e}") from None


def _prompt_names(spec: WorkflowSpec) -> list[str]:
    from dclip_ray.prompts import parse_prompt_file

    return [s.name for s in parse_prompt_file(spec.prompts.text() or spec.prompts.file or "")]


def _step_precompute(spec: WorkflowSpec, verbose: bool, progress: bool) -> dict[str, Any]:
    from .precompute import PrecomputeJob, run_precompute

    job = PrecomputeJob(model=spec.model, input=spec.input_url, out=spec.latent_store, config=spec.precompute_config(),
                        resources=spec.resources(), preset=spec.preset, address=spec.ray.address,
                        num_cpus=spec.ray.num_cpus, verbose=verbose)
    s = run_precompute(job, progress=progress)
    return {"shards": len(s["shards"]), "processed": len(s["shards"]) - s["n_skipped"], "skipped": s["n_skipped"],
            "images": s["n_images"], "errors": s["n_errors"], "store": s["store"], "unreadable": s["unreadable"]}


def _step_finetune(spec: WorkflowSpec, verbose: bool, progress: bool) -> dict[str, Any]:
    from .finetune_many import FinetuneManyJob, run_finetune_many

    ft, r = spec.finetune, spec.ray
    settings = {"t0": spec.latents.t0, "n_inv_steps": spec.latents.n_inv, **ft.settings()}
    job = FinetuneManyJob(prompts=spec.prompts.text() or spec.prompts.file or "", model=spec.model,
                          out=spec.models_dir, latents=spec.latent_store, images=spec.input_url, preset=spec.preset,
                          clip=ft.clip, clip_weights=ft.clip_weights, face_weights=ft.face_weights,
                          settings=settings, training_sets=spec.training_sets(), check=spec.quality_check(),
                          resources=spec.resources(), address=r.address, num_cpus=r.num_cpus, verbose=verbose)
    s = run_finetune_many(job, progress=progress)
    low = sum(p["status"] == "failed (quality)" for p in s["prompts"])
    return {"prompts": len(s["prompts"]), "trained": s["n_ok"], "skipped": s["n_skipped"],
            "failed": s["n_failed"] - low, "failed_quality": low,
            "models": {p["name"]: {"status": p["status"], "path": p["model_path"], "final_loss": p["final_loss"],
                                   "quality_s_dir": p["quality_s_dir"], "training_set": p.get("training_set"),
                                   "quality": p.get("quality") or {},
                                   **({"error": p["error"]} if p["error"] else {})}
                       for p in s["prompts"]}, "warnings": s.get("warnings", [])}


def restyle_plan(spec: WorkflowSpec, ok_models: set[str]) -> tuple[str, list[str] | None, dict[str, Any] | None, list[str]]:
    """(output root, model folders or None, mix or None, prompt names left out because their model
    failed). Outputs go to ``restyled/{name}`` per variant and ``restyled/mix`` for a mix, whatever
    their number (:func:`~dclip_ray.stages.restyle_config.build_restyle_config`), so the layout never
    changes when a variant is added."""
    rs, root = spec.restyle, spec.restyled_dir.rstrip("/")
    models_root = spec.models_dir.rstrip("/")
    if rs.mix is not None:
        missing = [n for n in rs.mix.models if n not in ok_models]
        if missing:
            return root, None, None, missing
        mix = {"models": [f"{models_root}/{n}" for n in rs.mix.models], "gamma": dict(rs.mix.gamma)}
        return root, None, mix, []
    names = rs.variants or _prompt_names(spec)
    kept = [n for n in names if n in ok_models]
    return root, [f"{models_root}/{n}" for n in kept], None, [n for n in names if n not in ok_models]


def _step_restyle(spec: WorkflowSpec, ok_models: set[str], verbose: bool, progress: bool) -> dict[str, Any]:
    from dclip_ray.stages.restyle_config import build_restyle_config

    from .restyle import RestyleJob, run_restyle

    out, models, mix, left_out = restyle_plan(spec, ok_models)
    if not models and mix is None:
        return {"status": "skipped (no fine-tuned model)", "left_out": left_out, "processed": 0}
    rs, res = spec.restyle_settings(), spec.resources()
    cfg = build_restyle_config(out, models=models, mix=mix, base=spec.model, preset=spec.preset, settings=rs,
                               latents=spec.latent_store, clip=spec.finetune.clip, clip_weights=spec.finetune.clip_weights)
    job = RestyleJob(config=cfg, input=spec.input_url, limit=rs.limit, actors=res.actors, cpus_per_actor=res.cpus_per_actor,
                     gpus_per_actor=res.gpus_per_actor, address=spec.ray.address, num_cpus=spec.ray.num_cpus,
                     verbose=verbose, shard_timeout=res.shard_timeout)
    s = run_restyle(job, progress=progress)
    return {"shards": len(s["shards"]), "processed": len(s["shards"]) - s["n_skipped"], "skipped": s["n_skipped"],
            "images": s["n_images"], "errors": s["n_errors"], "unreadable": s["unreadable"], "rejected": s["n_rejected"],
            "min_score": s["min_score"],
            "scores": {k: {f: v[f] for f in ("n", "mean", "p10", "p50", "p90", "n_rejected")}
                       for k, v in s["scores"].items()},
            "gen_evals": s["gen_evals"], "inv_evals": s["inv_evals"], "images_per_s": s["images_per_s"],
            "unet_evals_per_s": s["unet_evals_per_s"], "unet_share": s["unet_share"], "outputs": s["outputs"], "left_out": left_out, "pool": s["pool"],
            "nodes": len({r["node"] for r in s["shards"] if r.get("node")})}


def _step_verify(spec: WorkflowSpec, ok_models: set[str]) -> dict[str, Any]:
    from .verify import run_verify

    if spec.restyle.limit is not None:
        return {"status": "skipped (restyle.limit set: not every input shard is restyled)"}
    root, models, mix, _ = restyle_plan(spec, ok_models)
    from dclip_ray.stages.restyle_config import variant_name

    folders = [f"{root}/mix"] if mix is not None else [f"{root}/{variant_name(m)}" for m in models or []]
    r = run_verify(spec.restyled_dir, spec.input_url, spec.ray.address, folders=folders or None)  # Ray is up: tasks
    return {"ok": r.ok, "outputs": len(r.outputs), "shards": len(r.shards), "keys": sum(s.get("n", 0) for s in r.shards),
            "error_rows": sum(s.get("n_error", 0) for s in r.shards),
            "skipped_rows": sum(s.get("n_skipped", 0) for s in r.shards),
            "rejected_rows": sum(s.get("n_rejected", 0) for s in r.shards), "problems": len(r.problems),
            "first_problems": r.problems[:5]}


def _step_report(spec: WorkflowSpec) -> dict[str, Any]:
    if not spec.outputs.report:
        return {"status": "skipped (outputs.report: false)"}
    if is_remote(spec.outputs.root):
        return {"status": "skipped (the report is written for a local outputs.root only)"}
    try:
        from dclip_ray.evaluation.report import write_report
    except ModuleNotFoundError as e:
        if e.name in ("dclip_ray.evaluation", "dclip_ray.evaluation.report"):
            return {"status": "skipped (not available)"}
        raise
    except ImportError as e:  # the module is there but has no write_report
        if "write_report" in str(e):
            return {"status": "skipped (not available)"}
        raise
    config = {"workflow spec (as run, paths resolved)": spec.model_dump(mode="json")}
    return {"status": "ok", "path": write_report(spec.outputs.root, config=config)}


def run_workflow(spec: WorkflowSpec, progress: bool = True, verbose: bool = False,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole spec once and return its run record (also appended to ``spec.ledger``).

    The record: ``{"run_id", "spec", "name", "start", "end", "seconds", "status", "exit_code", "steps":
    {"input", "precompute", "finetune", "restyle", "verify", "report"}, "host", "ray_address"}``; per-step
    counts include ``processed`` and ``skipped`` shards or prompts, so a second run over the same input
    shows ``processed == 0`` everywhere. A :class:`DclipError` from a step (configuration error, aborted
    shard) is recorded with its exit code and re-raised; SIGINT / SIGTERM (:class:`Interrupted` or
    ``KeyboardInterrupt``) as ``interrupted`` (exit 3); any other exception as ``crashed`` (exit 3); all
    are re-raised.
    """
    t_start = time.time()
    record: dict[str, Any] = {
        "run_id": f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
        "spec": spec.source, "name": spec.name, "start": _now(), "end": None, "seconds": None, "status": "running",
        "exit_code": None, "steps": {}, "host": socket.gethostname(),
        "ray_address": spec.ray.address or os.environ.get("RAY_ADDRESS") or "embedded",
    }
    steps = record["steps"]
    _check_locations(spec, ledger_only=True)  # a ledger refused for its place is never written, not even this record
    try:
        preflight(spec)
        code = _run_steps(spec, _stepper(steps, log or (lambda _msg: None)), steps, verbose, progress)
        record["exit_code"] = code
        record["status"] = STATUS_OF_CODE[code]
    except DclipError as e:
        record.update(exit_code=e.exit_code, status=STATUS_OF_CODE.get(e.exit_code, "error"), error=str(e))
        _mark_running(steps, str(e))
        raise
    except (Interrupted, KeyboardInterrupt) as e:  # SIGINT / SIGTERM: a re-run of the same spec resumes
        signame = getattr(e, "signame", "SIGINT")
        record.update(exit_code=EXIT_ABORTED, status="interrupted",
                      error=f"interrupted ({signame}); re-run the same spec to resume")
        _mark_running(steps, record["error"])
        raise
    except BaseException as e:
        record.update(exit_code=EXIT_ABORTED, status="crashed", error=f"{type(e).__name__}: {e}"[:500])
        _mark_running(steps, record["error"])
        raise
    finally:
        record["end"] = _now()
        record["seconds"] = round(time.time() - t_start, 2)
        clean = redact_data(record)  # the record --json prints is the one written: no secret of a URL
        record.clear()
        record.update(clean)
        append_ledger(spec.ledger, record)
    return record


Step = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]]


def _stepper(steps: dict[str, Any], say: Callable[[str], None]) -> Step:
    """``step(name, fn)``: run one step, recording it in ``steps`` ("running" while it runs, then its
    result with ``status`` and ``seconds``) and saying one line before and after."""

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        say(f"[{name}] ...")
        t = time.perf_counter()
        steps[name] = {"status": "running"}
        out = fn()
        out.setdefault("status", "ok")
        out["seconds"] = round(time.perf_counter() - t, 2)
        steps[name] = out
        say(f"[{name}] {out['status']}: " + ", ".join(f"{k}={v}" for k, v in out.items()
                                                      if isinstance(v, (int, float)) and not isinstance(v, bool)))
        return out

    return step


def _run_steps(spec: WorkflowSpec, step: Step, steps: dict[str, Any], verbose: bool, progress: bool) -> int:
    """input -> precompute -> finetune -> restyle -> verify -> report; the run's exit code (0, 2 for
    per-item errors or verify problems, 3 when a prompt failed). A step's exception propagates."""
    code = EXIT_OK
    step("input", lambda: {"written_shards": ensure_toyworld_input(spec), "url": spec.input_url})
    from .runtime import init_ray

    # once, with the dashboard on (Ray Train needs it); every step then uses this Ray
    init_ray(spec.ray.address, spec.ray.num_cpus, dashboard=True, verbose=verbose)
    pre = step("precompute", lambda: _step_precompute(spec, verbose, progress))
    if pre["errors"] or pre.get("unreadable"):
        pre["status"] = "finished with per-item errors" + (" and unreadable input shards" if pre.get("unreadable") else "")
        code = max(code, EXIT_ITEM_ERRORS)
    ft = step("finetune", lambda: _step_finetune(spec, verbose, progress))
    ok_models = {n for n, m in ft["models"].items() if m["status"].startswith(("ok", "skipped"))}
    if ft.get("failed_quality"):
        ft["status"] = (f"{ft['failed_quality']} prompt(s) failed the quality check (models kept apart as NAME.failed; "
                        "see each model's quality.reason; finetune.restarts or finetune.accept_low_quality)")
        code = max(code, EXIT_ITEM_ERRORS)
    if ft["failed"]:
        ft["status"] = f"{ft['failed']} prompt(s) failed; re-run to resume them"
        code = max(code, EXIT_ABORTED)
    rs = step("restyle", lambda: _step_restyle(spec, ok_models, verbose, progress))
    if rs.get("errors") or rs.get("unreadable"):
        rs["status"] = "finished with per-item errors" + (" and unreadable input shards" if rs.get("unreadable") else "")
        code = max(code, EXIT_ITEM_ERRORS)
    if rs.get("processed") is None or str(rs.get("status", "")).startswith("skipped"):
        steps["verify"] = {"status": "skipped (nothing restyled)"}
    else:
        v = step("verify", lambda: _step_verify(spec, ok_models))
        if v.get("ok") is False:
            v["status"] = f"{v['problems']} problem(s)"
            code = max(code, EXIT_ITEM_ERRORS)
    try:
        step("report", lambda: _step_report(spec))
    except Exception as e:  # noqa: BLE001  (the outputs are done; the report is recorded as failed)
        steps["report"] = {"status": f"failed: {type(e).__name__}: {e}"[:500]}
        code = max(code, EXIT_ITEM_ERRORS)
    return code


def _mark_running(steps: dict[str, Any], error: str) -> None:
    for s in steps.values():
        if s.get("status") == "running":
            s["status"] = f"failed: {error}"[:500]
