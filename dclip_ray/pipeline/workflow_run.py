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
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from dclip_ray.errors import EXIT_ABORTED, EXIT_ITEM_ERRORS, EXIT_OK, ConfigError, DclipError, Interrupted
from dclip_ray.urls import redact_data
from dclip_ray.workflow.checks import (
    check_locations,
    check_spec,
    ensure_toyworld_input,
    report_step,
    restyle_plan,
)
from dclip_ray.workflow.ledger import STATUS_OF_CODE, Step, append_ledger, mark_running, now, stepper
from dclip_ray.workflow.spec import WorkflowSpec

from .runtime import check_local_ray, init_ray


def preflight(spec: WorkflowSpec) -> None:
    """Fail before any work (and before Ray starts): the spec's paths, places and names
    (:func:`~dclip_ray.workflow.checks.check_spec`), then whether Ray may start here. Raises
    :class:`ConfigError` naming the spec field."""
    check_spec(spec)
    try:
        check_local_ray(spec.ray.address)  # every run starts Ray
    except ConfigError as e:
        raise ConfigError(f"workflow spec {spec.source or spec.name}: {e}") from None


def _step_precompute(spec: WorkflowSpec, verbose: bool, progress: bool) -> dict[str, Any]:
    from .precompute import PrecomputeJob, run_precompute

    o = spec.run_options()  # the job options a spec sets (preset, finetune.clip*, ray.address)
    job = PrecomputeJob(model=spec.model, input=spec.input_url, out=spec.latent_store, config=spec.precompute_config(),
                        resources=spec.resources(), preset=o.preset, address=o.address,
                        num_cpus=spec.ray.num_cpus, verbose=verbose)
    s = run_precompute(job, progress=progress)
    return {"shards": len(s["shards"]), "processed": len(s["shards"]) - s["n_skipped"], "skipped": s["n_skipped"],
            "images": s["n_images"], "errors": s["n_errors"], "store": s["store"], "unreadable": s["unreadable"]}


def _step_finetune(spec: WorkflowSpec, verbose: bool, progress: bool) -> dict[str, Any]:
    from .finetune_many import FinetuneManyJob, run_finetune_many

    o = spec.run_options()
    settings = {"t0": spec.latents.t0, "n_inv_steps": spec.latents.n_inv, **spec.finetune.settings()}
    job = FinetuneManyJob(prompts=spec.prompts.text() or spec.prompts.file or "", model=spec.model,
                          out=spec.models_dir, latents=spec.latent_store, images=spec.input_url, preset=o.preset,
                          clip=o.clip, clip_weights=o.clip_weights, face_weights=o.face_weights,
                          settings=settings, training_sets=spec.training_sets(), check=spec.quality_check(),
                          resources=spec.resources(), address=o.address, num_cpus=spec.ray.num_cpus, verbose=verbose)
    s = run_finetune_many(job, progress=progress)
    low = sum(p["status"] == "failed (quality)" for p in s["prompts"])
    return {"prompts": len(s["prompts"]), "trained": s["n_ok"], "skipped": s["n_skipped"],
            "failed": s["n_failed"] - low, "failed_quality": low,
            "models": {p["name"]: {"status": p["status"], "path": p["model_path"], "final_loss": p["final_loss"],
                                   "quality_s_dir": p["quality_s_dir"], "training_set": p.get("training_set"),
                                   "quality": p.get("quality") or {},
                                   **({"error": p["error"]} if p["error"] else {})}
                       for p in s["prompts"]}, "warnings": s.get("warnings", [])}


def _step_restyle(spec: WorkflowSpec, ok_models: set[str], verbose: bool, progress: bool) -> dict[str, Any]:
    from dclip_ray.stages.restyle_config import build_restyle_config

    from .restyle import RestyleJob, run_restyle

    out, models, mix, left_out = restyle_plan(spec, ok_models)
    if not models and mix is None:
        return {"status": "skipped (no fine-tuned model)", "left_out": left_out, "processed": 0}
    rs, res, o = spec.restyle_settings(), spec.resources(), spec.run_options()
    cfg = build_restyle_config(out, models=models, mix=mix, base=spec.model, preset=o.preset, settings=rs,
                               latents=spec.latent_store, clip=o.clip, clip_weights=o.clip_weights)
    job = RestyleJob(config=cfg, input=spec.input_url, limit=rs.limit, actors=res.actors, cpus_per_actor=res.cpus_per_actor,
                     gpus_per_actor=res.gpus_per_actor, address=o.address, num_cpus=spec.ray.num_cpus,
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
        "spec": spec.source, "name": spec.name, "start": now(), "end": None, "seconds": None, "status": "running",
        "exit_code": None, "steps": {}, "host": socket.gethostname(),
        "ray_address": spec.ray.address or os.environ.get("RAY_ADDRESS") or "embedded",
    }
    steps = record["steps"]
    check_locations(spec, ledger_only=True)  # a ledger refused for its place is never written, not even this record
    try:
        preflight(spec)
        code = _run_steps(spec, stepper(steps, log or (lambda _msg: None)), steps, verbose, progress)
        record["exit_code"] = code
        record["status"] = STATUS_OF_CODE[code]
    except DclipError as e:
        record.update(exit_code=e.exit_code, status=STATUS_OF_CODE.get(e.exit_code, "error"), error=str(e))
        mark_running(steps, str(e))
        raise
    except (Interrupted, KeyboardInterrupt) as e:  # SIGINT / SIGTERM: a re-run of the same spec resumes
        signame = getattr(e, "signame", "SIGINT")
        record.update(exit_code=EXIT_ABORTED, status="interrupted",
                      error=f"interrupted ({signame}); re-run the same spec to resume")
        mark_running(steps, record["error"])
        raise
    except BaseException as e:
        record.update(exit_code=EXIT_ABORTED, status="crashed", error=f"{type(e).__name__}: {e}"[:500])
        mark_running(steps, record["error"])
        raise
    finally:
        record["end"] = now()
        record["seconds"] = round(time.time() - t_start, 2)
        clean = redact_data(record)  # the record --json prints is the one written: no secret of a URL
        record.clear()
        record.update(clean)
        append_ledger(spec.ledger, record)
    return record


def _run_steps(spec: WorkflowSpec, step: Step, steps: dict[str, Any], verbose: bool, progress: bool) -> int:
    """input -> precompute -> finetune -> restyle -> verify -> report; the run's exit code (0, 2 for
    per-item errors or verify problems, 3 when a prompt failed). A step's exception propagates."""
    code = EXIT_OK
    step("input", lambda: {"written_shards": ensure_toyworld_input(spec), "url": spec.input_url})
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
        step("report", lambda: report_step(spec))
    except Exception as e:  # noqa: BLE001  (the outputs are done; the report is recorded as failed)
        steps["report"] = {"status": f"failed: {type(e).__name__}: {e}"[:500]}
        code = max(code, EXIT_ITEM_ERRORS)
    return code


