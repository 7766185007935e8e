"""`dclip-ray precompute`, `finetune-many`, `restyle` and `verify`: the distributed pipeline (parse and call).

Ray is imported only when one of these commands runs (inside the command functions).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import typer
from rich.table import Table

from dclip_ray import plain
from dclip_ray.config import (
    PrecomputeConfig,
    QualityCheck,
    Resources,
    RestyleSettings,
    RunOptions,
    TrainingSets,
)
from dclip_ray.models.trust import trust_scope

from .common import app, mix_example
from .settings import NO_OPTIONS, config_options, finetune_options, run_options
from .terminal import to_stderr, to_stdout

FACE_SCORE_HELP = ("Local InceptionResnetV1 weights (facenet-pytorch, VGGFace2): each edit's scores gain the "
                   "identity cosine of the face before and after (faces).")
SCORE_CLIP_HELP = ("CLIP that scores every edit per image in the manifest (default: the one the models were "
                   "fine-tuned with, from their dclip.json); --min-score rejects by that score.")



def _setup(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not verbose:
        from diffusers.utils import logging as diffusers_logging

        from .terminal import filter_native_logs

        diffusers_logging.set_verbosity_error()
        filter_native_logs()  # Ray's own 'E ... core_worker.cc' lines are not news (on a terminal)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


@app.command(epilog="""Example (toy world): dclip-ray toyworld make-data --out toy/ --n 256 --shard-size 64\n
  dclip-ray precompute --model toy_shapes --input toy/ --t0 500 --n-inv 40 --out latents/""")
@config_options(PrecomputeConfig, "settings")
@config_options(Resources, "resources", only=("cpus_per_task", "gpus_per_task"))
@run_options("preset", "trust_checkpoint", "address", "as_json", "verbose", "quiet")
def precompute(
    model: str = typer.Option(..., help="The ORIGINAL base UNet: preset name, diffusers folder, checkpoint or URL."),
    input: str = typer.Option(..., "--input", help="Input shards: folder, .tar, brace list or glob; local or fsspec URL."),
    out: str = typer.Option(..., help="Latent store root (local folder or fsspec URL)."),
    settings: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Invert every image with the original model once and cache the latents (one Ray task per shard)."""
    _setup(opts.verbose)
    from dclip_ray.pipeline.precompute import PrecomputeJob, run_precompute

    job = PrecomputeJob(model=model, input=input, out=out, config=PrecomputeConfig(**(settings or {})),
                        resources=Resources(**(resources or {})), preset=opts.preset, address=opts.address,
                        verbose=opts.verbose, trust_checkpoint=opts.trust_checkpoint)
    with trust_scope(opts.trust_checkpoint):
        s = run_precompute(job, progress=opts.progress)
    if opts.as_json:
        print(plain.dumps(s))
    else:
        t = Table(title=f"latents -> {s['store']}")
        for c in ("shard", "status", "images", "errors", "seconds"):
            t.add_column(c)
        for r in s["shards"]:
            t.add_row(r["shard"], _shard_status(r), _fmt(r.get("n_ok")), _fmt(r.get("n_error")), _fmt(r.get("seconds")))
        to_stdout().print(t)
    for key, reason in list(s["errors"].items())[:20]:
        to_stderr().print(f"[yellow]error[/] {key}: {reason}")
    for w in s["warnings"]:
        to_stderr().print(f"[yellow]warning[/] {w}")
    _print_unreadable(s["unreadable"])
    raise typer.Exit(2 if s["n_errors"] or s["unreadable"] else 0)


def _shard_status(r: dict[str, Any]) -> str:
    if r.get("truncated") and not r.get("skipped"):
        return "UNREADABLE (not committed)"
    return ("re-sorted (--min-score)" if r.get("rethresholded") else "skipped (committed)" if r.get("skipped")
            else "done")


def _print_unreadable(unreadable: dict[str, str]) -> None:
    for shard, why in unreadable.items():
        to_stderr().print(f"[red]unreadable[/] input shard {shard}: {why}; nothing of it is committed: fix or "
                          "replace the file, then re-run", markup=True, highlight=False)


@app.command("finetune-many", epilog="""Example (toy world):\n
  printf 'red circle -> blue circle name=blue\\nred circle -> green circle name=green\\n' > prompts.txt\n
  dclip-ray finetune-many prompts.txt --model toy_shapes --latents latents/ --out models/ --lr 1e-5 --t0 500""")
@finetune_options()
@config_options(TrainingSets, "selection")
@config_options(QualityCheck, "quality")
@config_options(Resources, "resources", only=("cpus_per_prompt", "gpus_per_prompt", "max_failures", "max_concurrent"))
@run_options("preset", "clip", "clip_weights", "face_weights", "trust_checkpoint", "address", "as_json", "verbose",
             "quiet", helps={"face_weights": "InceptionResnetV1 weights for the identity loss (lines with id > 0)."})
def finetune_many(
    prompts: str = typer.Argument(..., help="Prompt file: one 'SOURCE -> TARGET key=value ...' or preset per line."),
    model: str = typer.Option(..., help="The base UNet (preset name, folder, checkpoint or URL)."),
    out: str = typer.Option(..., help="Output root: one fine-tuned model folder per prompt name."),
    latents: str = typer.Option(None, help="Latent store root from `dclip-ray precompute` (images are re-read from the shards it names)."),
    images: str = typer.Option(None, help="Training images (used to invert when no cached latents match)."),
    settings: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    quality: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Fine-tune one model per prompt line on Ray Train, several at once; resumable. Each prompt trains on
    the first n_train images that match its SOURCE (by caption, else zero-shot CLIP; a line's images=
    gives its own). Each fine-tuning option is the default of every line; a line's own key=value wins (see
    the option's 'prompt line' name)."""
    _setup(opts.verbose)
    from dclip_ray.pipeline.finetune_many import FinetuneManyJob, run_finetune_many

    job = FinetuneManyJob(prompts=prompts, model=model, out=out, latents=latents, images=images, preset=opts.preset,
                          clip=opts.clip, clip_weights=opts.clip_weights, face_weights=opts.face_weights,
                          settings=dict(settings or {}), training_sets=TrainingSets(**(selection or {})),
                          check=QualityCheck(**(quality or {})), resources=Resources(**(resources or {})),
                          address=opts.address, verbose=opts.verbose)
    with trust_scope(opts.trust_checkpoint):
        s = run_finetune_many(job, progress=opts.progress)
    if opts.as_json:
        print(plain.dumps(s))
    else:
        t = Table(title="finetune-many")
        for c in ("prompt", "status", "images (by, confidence)", "final loss", "check score", "spread", "model path"):
            t.add_column(c)
        for r in s["prompts"]:
            ts = r.get("training_set") or {}
            chosen = (f"{ts.get('matched', '')} ({', '.join(ts.get('by') or {})}, {_fmt(ts.get('confidence'))})"
                      if "matched" in ts else ", ".join(ts.get("by") or {}))
            m = (r.get("quality") or {}).get("measured") or {}
            runs = f" ({len(r['restarts'])} restarts)" if len(r.get("restarts") or []) > 1 else ""
            t.add_row(f"{r['name']}: {r['source']} -> {r['target']}", r["status"] + runs, chosen,
                      _fmt(r["final_loss"]), _fmt(m.get("score")), _fmt(m.get("spread")), r["model_path"])
        to_stdout().print(t)
    for w in s.get("warnings", []):
        to_stderr().print(f"[yellow]warning[/] {w}")
    for r in s["prompts"]:
        if r.get("error"):
            to_stderr().print(f"[red]failed[/] {r['name']}: {r['error']}")
    raise typer.Exit(2 if s["n_failed"] else 0)


def _read_mix(path: str) -> dict[str, Any]:
    from dclip_ray.mixing import load_mix_spec

    return load_mix_spec(path).as_dict()


@app.command(epilog="""Examples:\n
  dclip-ray restyle --input toy/ --model models/blue --out restyled/ --n-gen 20\n
  dclip-ray restyle --input toy/ --model models/blue --model models/green --out restyled/   (one inversion, 2 outputs)\n
  dclip-ray restyle --input toy/ --mix mix.yaml --out mixed/ --dry-run\n
""" + mix_example("models/blue", "models/green"))
@config_options(RestyleSettings, "settings")
@config_options(Resources, "resources", only=("actors", "cpus_per_actor", "gpus_per_actor", "shard_timeout"))
@run_options("preset", "clip", "clip_weights", "score_clip", "score_clip_weights", "face_weights", "trust_checkpoint",
             "address", "as_json", "verbose", "quiet", helps={
                 "clip": "CLIP that routes uncaptioned images with --route source (default: the one the models were "
                         "fine-tuned with).",
                 "preset": "Architecture preset for a raw base checkpoint.",
                 "score_clip": SCORE_CLIP_HELP, "face_weights": FACE_SCORE_HELP})
def restyle(
    input: str = typer.Option(..., "--input", help="Input shards: folder, .tar, brace list or glob; local or fsspec URL."),
    out: str = typer.Option(..., help="Output root (local folder or fsspec URL)."),
    model: list[str] = typer.Option(None, help="Fine-tuned model folder (a full UNet or a LoRA adapter: adapters "
                                    "share one copy of the base per actor); repeat for several (one output each, "
                                    "out/NAME, whatever their number)."),
    mix: str = typer.Option(None, help="YAML with 'models: (dirs)' and a 'gamma' spec (one mixed output, out/mix)."),
    base: str = typer.Option(None, help="The ORIGINAL base UNet (default: the one named in the models' dclip.json; "
                             "a LoRA adapter of another base is refused)."),
    latents: str = typer.Option(None, help="Latent store root, or the key folder precompute printed (cached inversions "
                                "are used when their key and the image bytes match; a miss is reported)."),
    require_latents: bool = typer.Option(False, "--require-latents", help="Fail (exit 1, nothing started) unless "
                                         "--latents holds current latents for every shard to restyle."),
    dry_run: bool = typer.Option(False, help="Print the shards, images and UNet evaluations it would run; write nothing."),
    settings: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Restyle a dataset with fine-tuned model(s) on Ray Data; every input key ends up exactly once in the
    output shards or as an error row of the manifests."""
    _setup(opts.verbose)
    from dclip_ray.pipeline.restyle import RestyleJob, plan, run_restyle
    from dclip_ray.stages.restyle_config import build_restyle_config

    rs, res = RestyleSettings(**(settings or {})), Resources(**(resources or {}))
    cfg = build_restyle_config(out, models=list(model or []) or None, base=base, mix=_read_mix(mix) if mix else None,
                               preset=opts.preset, settings=rs, latents=latents,
                               trust_checkpoint=opts.trust_checkpoint, clip=opts.clip, clip_weights=opts.clip_weights,
                               score_clip=opts.score_clip, score_clip_weights=opts.score_clip_weights,
                               face_weights=opts.face_weights)
    job = RestyleJob(config=cfg, input=input, limit=rs.limit, actors=res.actors, cpus_per_actor=res.cpus_per_actor,
                     gpus_per_actor=res.gpus_per_actor, address=opts.address, verbose=opts.verbose,
                     shard_timeout=res.shard_timeout, require_latents=require_latents)
    with trust_scope(opts.trust_checkpoint):
        if dry_run:
            _print_plan(plan(job), opts.as_json)
            raise typer.Exit(0)
        s = run_restyle(job, progress=opts.progress)
    raise typer.Exit(_print_restyle(s, opts.as_json))


def print_scores(scores: dict[str, dict[str, Any]], as_json: bool) -> None:
    """Print each variant's score distribution and its lowest-scored edits (not with --json: the
    summary holds them)."""
    if as_json or not scores:
        return
    t = Table(title="edit scores (judge-free: S_dir - 0.5(1 - SSIM) - 4 x frame change; higher is better)")
    for c in ("output", "scored", "mean", "min", "p10", "median", "p90", "rejected", "lowest (key: score)"):
        t.add_column(c)
    for name, d in scores.items():
        low = ", ".join(f"{x['key']}: {x['score']:.3f}" for x in d["lowest"][:3])
        t.add_row(name, str(d["n"]), *(_fmt(d[k]) for k in ("mean", "min", "p10", "p50", "p90")),
                  str(d["n_rejected"]), low)
    to_stdout().print(t)


def _print_plan(p: dict[str, Any], as_json: bool) -> None:
    """Print a restyle's ``--dry-run`` plan (a table, or JSON) and its warnings."""
    if as_json:
        print(plain.dumps(p))
    else:
        pool = p["pool"]
        t = Table(title=f"restyle dry run: {p['images']} images, {p['unet_evals']} UNet evaluations (t0 "
                  f"{', '.join(map(str, p['t0s']))}; route {p['route']}); {pool['actors']} actor(s) would start: "
                  f"{pool['why']}")
        for c in ("shard", "images", "cached latents", "committed", "UNet evaluations"):
            t.add_column(c)
        for r in p["shards"]:
            t.add_row(r["shard"], str(r["images"]), str(r["cached_latents"]), "yes" if r["committed"] else "no",
                      str(r["unet_evals"]))
        to_stdout().print(t)
    for w in p["warnings"]:
        to_stderr().print(f"[yellow]warning[/] {w}")


def _print_restyle(s: dict[str, Any], as_json: bool) -> int:
    """Print a restyle's summary (a table, or JSON) and its warnings; the exit code (2: per-item errors
    or stuck shards)."""
    if as_json:
        print(plain.dumps(s))
    else:
        pool = s.get("pool")
        ran = (f"; {pool['actors_ran']} actor(s) ran on {pool['nodes_ran']} node(s) ({pool['actors_started']} "
               f"started: {pool['why']})" if pool else "")
        t = Table(title=f"restyle -> {', '.join(s['outputs'])}{ran}")
        for c in ("shard", "status", "ok", "errors", "routed away", "inversions", "cached", "seconds"):
            t.add_column(c)
        for r in s["shards"]:
            t.add_row(r["shard"], _shard_status(r), _fmt(r.get("n_ok")),
                      _fmt(r.get("n_error")), _fmt(r.get("n_routed")), _fmt(r.get("inv_evals")),
                      _fmt(r.get("n_cached")), _fmt(r.get("seconds")))
        to_stdout().print(t)
        if s.get("images_done"):
            to_stdout().print(f"{s['images_done']} image(s) restyled in {s['work_seconds']:.1f} s: "
                              f"{s['images_per_s']:g} images/s, {s['unet_evals_per_s']:g} UNet evaluations/s"
                              + (f"; {s['unet_share']:.0%} of the actors' time inside the UNet"
                                 if s.get("unet_share") is not None else ""))
    for w in s["warnings"]:
        to_stderr().print(f"[yellow]warning[/] {w}")
    if s["n_stale_latents"]:
        to_stderr().print(f"[yellow]warning[/] {s['n_stale_latents']} cached latent(s) were of older image bytes under the same "
                  "key and were not used (the images were inverted again); re-run precompute to refresh the store")
    print_scores(s.get("scores") or {}, as_json)
    if s["n_errors"]:
        to_stderr().print(f"[yellow]{s['n_errors']} input key(s) could not be restyled[/]: see the error rows of the *.parquet manifests")
    if s.get("n_rejected"):
        to_stderr().print(f"[yellow]{s['n_rejected']} edit(s) scored under --min-score {s['min_score']:g} were rejected[/]: "
                  "their rows say 'rejected'; the images are in each output's rejected/ folder, not in the output")
    for shard, why in s["stuck"].items():
        to_stderr().print(f"[red]stuck[/] shard {shard}: {why}; it is not committed: re-run the same command to retry it")
    _print_unreadable(s["unreadable"])
    return 2 if s["n_errors"] or s["stuck"] or s["unreadable"] else 0


@app.command(epilog="Example: dclip-ray verify restyled/ --input toy/")
@run_options("address", "as_json", helps={
    "address": "A Ray cluster: one verify task per input shard there (default: $RAY_ADDRESS, else threads in this "
               "process).", "as_json": "Print a machine-readable report."})
def verify(
    out: str = typer.Argument(..., help="Output root of a restyle (or of one of its models)."),
    input: str = typer.Option(..., "--input", help="The input the restyle read."),
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Check that every input key is exactly once in the output or the error manifest (exit 2 if not)."""
    from dclip_ray.pipeline.verify import run_verify

    r = run_verify(out, input, opts.address)
    if opts.as_json:
        print(json.dumps(r.as_dict(), indent=2, default=str))
    else:
        n = sum(s.get("n", 0) for s in r.shards)
        n_err = sum(s.get("n_error", 0) for s in r.shards)
        to_stdout().print(f"{len(r.outputs)} output folder(s), {len(r.shards)} shard(s), {n} keys ({n_err} error rows): "
                        + ("[green]OK[/]" if r.ok else f"[red]{len(r.problems)} problem(s)[/]"))
        for p in r.problems[:50]:
            to_stderr().print(f"[red]problem[/] {p}")
    raise typer.Exit(0 if r.ok else 2)
