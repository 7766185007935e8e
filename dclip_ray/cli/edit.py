"""`dclip-ray finetune`, `edit` and `latent-optim`: DiffusionCLIP on one machine (parse and call)."""

from __future__ import annotations

import logging
from typing import Any

import typer
from rich.table import Table

from dclip_ray import plain
from dclip_ray.config import QualityCheck, RestyleSettings, RunOptions, resolve_finetune_config
from dclip_ray.jobs import FinetuneJob, LatentOptimJob, run_finetune, run_latent_optim
from dclip_ray.models import get_preset, is_preset, trust_scope
from dclip_ray.stages.edit import EditJob, run_edit

from .common import app, mix_example
from .pipeline import print_scores
from .settings import NO_OPTIONS, config_options, finetune_options, run_options
from .terminal import to_stderr, to_stdout


def _emit(summary: dict[str, Any], as_json: bool, title: str) -> int:
    if as_json:
        print(plain.dumps(summary))
    else:
        table = Table(title=title, show_header=False)
        for k, v in summary.items():
            if k in ("config", "errors", "search", "rejected", "scores", "quality", "trials", "warnings"):
                continue
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        table.add_row("errors", str(len(summary.get("errors", []))))
        to_stdout().print(table)
        if summary.get("trials"):
            _print_trials(summary["trials"])
        if summary.get("quality"):
            _print_quality(summary["quality"])
        if summary.get("scores"):
            print_scores({"edit": summary["scores"]}, as_json)
    for w in summary.get("warnings", []):
        to_stderr().print(f"[yellow]warning[/] {w}")
    q = summary.get("quality") or {}
    if q.get("reason"):
        advice = ("lower --lr (--accept-low-quality never keeps a diverged model)" if "diverged" in q["reason"]
                  else "try --restarts 3, or --accept-low-quality")
        kept = ("kept anyway (--accept-low-quality)" if q.get("accepted_low_quality") else
                f"saved apart in {summary['model_path']} for inspection; {advice}")
        to_stderr().print(f"[{'yellow' if q.get('accepted_low_quality') else 'red'}]the model failed its check[/]: "
                      f"{q['reason']}; {kept}")
    for r in summary.get("rejected", []):
        to_stderr().print(f"[yellow]rejected[/] {r['key']}: {r['reason']}")
    for err in summary.get("errors", []):
        to_stderr().print(f"[yellow]skipped[/] {err['key']} ({err['shard']}): {err['error']}")
    return 2 if summary.get("errors") or summary.get("status") == "failed (quality)" else 0


def _print_trials(trials: dict[str, Any]) -> None:
    cols = ["t0", "lr", "w_l1", "w_edge", "seed", "score", "direction", "structure", "background", "spread",
            "passed"]
    table = Table(title=f"{len(trials['rows'])} fine-tunings (first: the recipe at the first seed; *: kept)")
    for c in ["", *cols]:
        table.add_column(c, justify="right")
    for i, r in enumerate(trials["rows"]):
        table.add_row("*" if i == trials["chosen"] else "",
                      *(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols))
    to_stdout().print(table)


def _print_quality(q: dict[str, Any]) -> None:
    m = q.get("measured") or {}
    where = "held-aside" if m.get("held_aside") else "training"
    table = Table(title=f"check: edits of {m.get('n_images')} {where} images", show_header=False)
    for k in ("score", "direction", "structure", "background", "spread"):
        table.add_row(k, "n/a" if m.get(k) is None else f"{m[k]:.4g}")
    table.add_row("bar (--min-quality)", "none" if q.get("min_quality") is None else f"{q['min_quality']:g}")
    table.add_row("--min-spread", f"{q.get('min_spread'):g}")
    table.add_row("passed", str(q.get("passed")))
    to_stdout().print(table)


@app.command(epilog="""Example (the toy world, CPU, about a minute):\n
  dclip-ray toyworld make-data --out toy/ --n 16 --colours red --shapes circle\n
  dclip-ray finetune --model toy_shapes --source "red circle" --target "blue circle" --images toy/ --out ft/blue\n
Settings not given come from a recipe (`dclip-ray recipes list`): --recipe NAME, else the model preset's
(the real models: paper; toy_shapes: colour, or shape / shape-upright when the edit changes the shape,
e.g. --target "red square"; name one to choose: --recipe shape).\n
A setting given beats the recipe's: --recipe shape --lr 5e-5. LoRA adapters instead of a full copy
(a small adapter file; the recipe's LoRA learning rate): --adapter lora --rank 8.\n
Every model is checked on --check-images images it was not trained on (after the first --n-train):
its edits' judge-free score against --min-quality (toy_shapes: its preset's bar) and whether its outputs
still depend on their inputs (--min-spread). A model that fails goes to OUT.failed and the exit code is 2
(--accept-low-quality keeps it). Three fine-tunings from seeds 0, 1, 2 side by side on Ray, the best kept:
  dclip-ray finetune --model toy_shapes --source "red circle" --target "blue circle" --images toy/ \\
    --out ft/blue --restarts 3\n
Search around the recipe with Ray Tune, scored the same way (every trial goes into dclip.json):
  dclip-ray finetune --model toy_shapes --source "red circle" --target "blue circle" --images toy/ \\
    --out ft/blue --n-train 8 --search\n
Real model:
  dclip-ray finetune --model celeba_hq.ckpt --preset celeba_hq --clip clip_vit_b16 --clip-weights ViT-B-16.pt \\
    --source face --target "angry face" --images faces/ --out ft/angry --t0 500""")
@finetune_options()
@config_options(QualityCheck, "quality")
@run_options("preset", "clip", "clip_weights", "face_weights", "score_clip", "score_clip_weights", "trust_checkpoint",
             "address", "as_json", "verbose", "quiet",
             helps={"face_weights": "InceptionResnetV1 weights for the identity loss (--id > 0).",
                    "score_clip": "--search / --restarts: a CLIP the loss does not use, for comparing the "
                                  "fine-tunings (default: the loss's).",
                    "address": "--search / --restarts: Ray cluster address (default: $RAY_ADDRESS, else an "
                               "embedded local Ray)."})
def finetune(
    model: str = typer.Option(..., help="Base UNet: preset name (toy_shapes), diffusers folder, .ckpt/.pt or URL."),
    source: str = typer.Option(..., help="Source text, e.g. 'face'."),
    target: str = typer.Option(..., help="Target text, e.g. 'angry face'."),
    images: str = typer.Option(..., help="Training images: folder, .tar shard(s), brace list or glob; local or URL."),
    out: str = typer.Option(..., help="Output folder (diffusers format + dclip.json)."),
    checkpoint_dir: str = typer.Option(None, help="Checkpoint here every epoch and resume from it."),
    tensorboard: str = typer.Option(None, help="Also log every step's losses and the lr to TensorBoard files here."),
    search: bool = typer.Option(False, "--search", help="Search t0, lr and the L1 and edge weights around the recipe with Ray Tune (each at every --restarts seed), ranked by the judge-free score of each model's edits of the --check-images held-aside images; the best is kept (every trial recorded in the model card). Short for --search-trials 8."),
    cpus_per_trial: float = typer.Option(1.0, help="--search / --restarts: CPUs each fine-tuning holds (they run in parallel as CPUs allow)."),
    settings: dict[str, Any] | None = None,
    quality: dict[str, Any] | None = None,
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Fine-tune a diffusion model so that its generations move SOURCE -> TARGET (one prompt)."""
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.ERROR)
    p = get_preset(opts.preset or model) if is_preset(opts.preset or model) else None
    if search and not (settings or {}).get("search_trials"):
        settings = {**(settings or {}), "search_trials": 8}
    cfg = resolve_finetune_config(source, target, settings, preset=p)
    job = FinetuneJob(model=model, images=images, out=out, preset=opts.preset,
                      clip=opts.clip, clip_weights=opts.clip_weights, face_weights=opts.face_weights,
                      checkpoint_dir=checkpoint_dir, tensorboard_dir=tensorboard, train=cfg,
                      check=QualityCheck(**(quality or {})))
    with trust_scope(opts.trust_checkpoint):
        if cfg.search_trials > 1 or cfg.restarts > 1:
            from dclip_ray.pipeline.search import SearchJob, finetune_trials

            sjob = SearchJob(model=model, trials=cfg.search_trials, cpus_per_trial=cpus_per_trial,
                             seed=cfg.seed, preset=opts.preset, clip=opts.clip, clip_weights=opts.clip_weights,
                             score_clip=opts.score_clip, score_clip_weights=opts.score_clip_weights,
                             check=job.check, address=opts.address, verbose=opts.verbose)
            summary = finetune_trials(job, sjob, progress=opts.progress)
        else:
            summary = run_finetune(job, progress=opts.progress)
    raise typer.Exit(_emit(summary, opts.as_json, f"fine-tuned {source!r} -> {target!r}"))


@app.command(epilog="""Example: dclip-ray edit --model toy_shapes --finetuned ft/blue --images toy/ --out edited/ --grid\n
Half-strength edit: add --strength 0.5; more steps: --n-gen 40 (the paper's test setting).\n
Two attributes at once (eq. 14): dclip-ray edit --model toy_shapes --mix mix.yaml --images toy/ --out both/\n
""" + mix_example("ft/blue", "ft/square"))
@config_options(RestyleSettings, "settings", exclude=("image_format", "route"))
@run_options("preset", "face_weights", "score_clip", "score_clip_weights", "trust_checkpoint", "as_json", "verbose",
             "quiet", helps={"preset": "Architecture preset for a raw base checkpoint."})
def edit(
    model: str = typer.Option(..., help="The ORIGINAL base UNet (used for inversion)."),
    finetuned: str = typer.Option(None, help="Fine-tuned model folder (from `dclip-ray finetune`)."),
    images: str = typer.Option(..., help="Images: folder, .tar shard(s), brace list or glob; local or URL."),
    out: str = typer.Option(..., help="Output folder for {key}.png (and grid.png)."),
    mix: str = typer.Option(None, help="Instead of --finetuned: a mix YAML (models + gamma(t), eq. 14)."),
    grid: bool = typer.Option(False, help="Also write a before/after grid.png."),
    settings: dict[str, Any] | None = None,
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Edit images with a fine-tuned model: invert with the original, generate with the fine-tuned one
    (the restyle unit of work on this machine: same manifests, resume and exactly-once)."""
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.ERROR)
    job = EditJob(model=model, finetuned=finetuned, mix=mix, images=images, out=out, preset=opts.preset,
                  settings=RestyleSettings(**(settings or {})), grid=grid, score_clip=opts.score_clip,
                  score_clip_weights=opts.score_clip_weights, face_weights=opts.face_weights)
    with trust_scope(opts.trust_checkpoint):
        summary = run_edit(job, progress=opts.progress)
    raise typer.Exit(_emit(summary, opts.as_json, "edit"))


@app.command("latent-optim", epilog="""Example (the first --limit images, 8 unless told otherwise):\n
  dclip-ray latent-optim --model toy_shapes --source "red circle" --target "blue circle" \\
    --images toy/ --out lo/ --grid""")
@run_options("preset", "clip", "clip_weights", "trust_checkpoint", "as_json", "verbose", "quiet")
def latent_optim(
    model: str = typer.Option(..., help="Base UNet (kept frozen)."),
    source: str = typer.Option(..., help="Source text."),
    target: str = typer.Option(..., help="Target text."),
    images: str = typer.Option(..., help="Images: folder, .tar shard(s); local or URL."),
    out: str = typer.Option(..., help="Output folder."),
    t0: int = typer.Option(None, help="Return step (default: the preset's)."),
    n_inv: int = typer.Option(40, help="Inversion steps."),
    n_gen: int = typer.Option(6, help="Generation steps (with gradients)."),
    iterations: int = typer.Option(30, help="Optimisation iterations."),
    lr: float = typer.Option(0.02, help="Adam learning rate on the latent."),
    l1: float = typer.Option(1.0, help="Weight of the L1 loss."),
    limit: int = typer.Option(8, help="Images to optimise."),
    grid: bool = typer.Option(False, help="Also write grid.png."),
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """The paper's baseline (Figure 9): optimise each image's latent x_t0 with the CLIP loss, model frozen."""
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.ERROR)
    job = LatentOptimJob(model=model, source=source, target=target, images=images, out=out, preset=opts.preset,
                         clip=opts.clip, clip_weights=opts.clip_weights, t0=t0, n_inv_steps=n_inv, n_gen_steps=n_gen,
                         iterations=iterations, lr=lr, w_l1=l1, limit=limit, grid=grid)
    with trust_scope(opts.trust_checkpoint):
        summary = run_latent_optim(job, progress=opts.progress)
    raise typer.Exit(_emit(summary, opts.as_json, "latent optimisation"))
