"""`dclip-ray translate`, `from-strokes`, `eval` and `report`: the paper's applications and the evaluation
(parse and call)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import typer
from rich.table import Table

from dclip_ray.applications import TranslateJob, run_translate
from dclip_ray.evaluation import EvalJob, evaluate
from dclip_ray.evaluation.report import write_report
from dclip_ray.models import trust_scope

from .common import QUIET_HELP, TRUST_HELP, app, progress_wanted
from .edit import _emit
from .terminal import to_stderr, to_stdout


def _translate(kind: str, model: str, images: str, out: str, finetuned: str | None, preset: str | None, t0: int,
               k: int, t0_edit: int | None, strength: float, n_inv: int, n_gen: int, n_domain: int | None, eta: float,
               seed: int, limit: int | None, batch_size: int, grid: bool, as_json: bool, verbose: bool,
               trust: bool, quiet: bool, score_clip: str | None, score_clip_weights: str | None,
               min_score: float | None) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR)
    job = TranslateJob(model=model, images=images, out=out, finetuned=finetuned, preset=preset, t0=t0, k=k,
                       t0_edit=t0_edit, strength=strength, n_inv_steps=n_inv, n_gen_steps=n_gen,
                       n_domain_steps=n_domain, eta=eta, seed=seed, limit=limit, batch_size=batch_size, grid=grid,
                       kind=kind, score_clip=score_clip, score_clip_weights=score_clip_weights, min_score=min_score,
                       trust_checkpoint=trust)
    with trust_scope(trust):
        summary = run_translate(job, progress=progress_wanted(as_json, quiet))
    raise typer.Exit(_emit(summary, as_json, kind))


_MODEL = "The ORIGINAL base UNet: preset name (toy_shapes), diffusers folder, .ckpt/.pt or URL."
_SCORE_CLIP = ("CLIP that scores every final edit (step 1 -> final, the fine-tuned model's source -> target) into "
               "OUT/scores.parquet (default: the CLIP the model was fine-tuned with, from its dclip.json).")
_MIN_SCORE = ("With --finetuned: an edit scored under this goes to OUT/rejected/{key}.png, never OUT (a "
              "'rejected' row with its scores in OUT/scores.parquet).")
_FT = "Fine-tuned model folder for the final edit (default: none, the original model reconstructs step 1)."


@app.command(epilog="""Example (toy world): shapes on an unseen background -> the toy domain -> edited:\n
  dclip-ray toyworld make-data --out photos/ --n 16 --style photo\n
  dclip-ray translate --model toy_shapes --images photos/ --out translated/ --t0 300 --k 2 --grid\n
  dclip-ray translate --model toy_shapes --finetuned ft/blue --images photos/ --out translated/ --k 2\n
Real model (paper Fig. 4a, e.g. a dog photo -> a face -> a Pixar face):
dclip-ray translate --model celeba_hq.ckpt --preset celeba_hq --finetuned ft/pixar --images dogs/ --out out/ --t0 500 --k 5""")
def translate(
    model: str = typer.Option(..., help=_MODEL),
    images: str = typer.Option(..., help="Source-domain images: folder, .tar shard(s), brace list or glob."),
    out: str = typer.Option(..., help="Output folder: {key}.png (final), domain/{key}.png (step 1), dclip_run.json."),
    finetuned: str = typer.Option(None, help=_FT),
    preset: str = typer.Option(None, help="Architecture preset for a raw base checkpoint."),
    t0: int = typer.Option(300, help="Step t0 the input is noised to (eq. 1); higher forgets more of the source."),
    k: int = typer.Option(1, help="Noise + denoise round trips with the original model (the official code's K)."),
    t0_edit: int = typer.Option(None, help="Return step of the edit (default: the fine-tuned model's t0, else --t0)."),
    strength: float = typer.Option(1.0, help="Edit strength r in [0, 1] of the fine-tuned model."),
    n_inv: int = typer.Option(40, help="Inversion steps S_inv of the edit."),
    n_gen: int = typer.Option(40, help="Generation steps S_gen."),
    n_domain: int = typer.Option(None, help="Generation steps of each round trip (default: --n-gen)."),
    eta: float = typer.Option(0.0, help="DDIM eta of the round trips (0 = deterministic generation)."),
    seed: int = typer.Option(0, help="Seed of the forward noise (same seed, same output)."),
    limit: int = typer.Option(None, help="Process at most this many images."),
    batch_size: int = typer.Option(16, help="Images per batch."),
    grid: bool = typer.Option(False, help="Also write grid.png (input / trained domain / edited rows)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
    verbose: bool = typer.Option(False, help="Show warnings and library logs."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
    score_clip: str = typer.Option(None, help=_SCORE_CLIP),
    score_clip_weights: str = typer.Option(None, help="Local weights of --score-clip."),
    min_score: float = typer.Option(None, help=_MIN_SCORE),
) -> None:
    """Unseen -> unseen translation (paper, Figure 4a): noise to t0, generate into the trained domain (K times),
    then invert and edit with a fine-tuned model."""
    _translate("translate", model, images, out, finetuned, preset, t0, k, t0_edit, strength, n_inv, n_gen, n_domain,
               eta, seed, limit, batch_size, grid, as_json, verbose, trust_checkpoint, quiet, score_clip,
               score_clip_weights, min_score)


@app.command("from-strokes", epilog="""Example (toy world): rough colour blobs -> clean shapes -> edited:\n
  dclip-ray toyworld make-data --out paintings/ --n 16 --style strokes\n
  dclip-ray from-strokes --model toy_shapes --images paintings/ --out gen/ --grid\n
  dclip-ray from-strokes --model toy_shapes --finetuned ft/blue --images paintings/ --out gen/ --k 3\n
Measured on the toy world (t0 300, k 2): 62 % of 16 stroke paintings become a clean shape of their colour, 12 % of the
bare paintings pass the same judge.""")
def from_strokes(
    model: str = typer.Option(..., help=_MODEL),
    images: str = typer.Option(..., help="Colour-block paintings (strokes): folder, .tar shard(s), brace list or glob."),
    out: str = typer.Option(..., help="Output folder: {key}.png (final), domain/{key}.png (step 1), dclip_run.json."),
    finetuned: str = typer.Option(None, help=_FT),
    preset: str = typer.Option(None, help="Architecture preset for a raw base checkpoint."),
    t0: int = typer.Option(300, help="Step t0 the painting is noised to (eq. 1)."),
    k: int = typer.Option(2, help="Noise + denoise round trips with the original model."),
    t0_edit: int = typer.Option(None, help="Return step of the edit (default: the fine-tuned model's t0, else --t0)."),
    strength: float = typer.Option(1.0, help="Edit strength r in [0, 1] of the fine-tuned model."),
    n_inv: int = typer.Option(40, help="Inversion steps S_inv of the edit."),
    n_gen: int = typer.Option(40, help="Generation steps S_gen."),
    n_domain: int = typer.Option(None, help="Generation steps of each round trip (default: --n-gen)."),
    eta: float = typer.Option(0.0, help="DDIM eta of the round trips (0 = deterministic generation)."),
    seed: int = typer.Option(0, help="Seed of the forward noise (same seed, same output)."),
    limit: int = typer.Option(None, help="Process at most this many images."),
    batch_size: int = typer.Option(16, help="Images per batch."),
    grid: bool = typer.Option(False, help="Also write grid.png (strokes / generated / edited rows)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
    verbose: bool = typer.Option(False, help="Show warnings and library logs."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
    score_clip: str = typer.Option(None, help=_SCORE_CLIP),
    score_clip_weights: str = typer.Option(None, help="Local weights of --score-clip."),
    min_score: float = typer.Option(None, help=_MIN_SCORE),
) -> None:
    """Stroke-conditioned generation (paper, Figure 4b): a rough painting -> a clean image of the trained domain,
    optionally edited by a fine-tuned model."""
    _translate("from-strokes", model, images, out, finetuned, preset, t0, k, t0_edit, strength, n_inv, n_gen,
               n_domain, eta, seed, limit, batch_size, grid, as_json, verbose, trust_checkpoint, quiet, score_clip,
               score_clip_weights, min_score)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def print_eval_summary(result: dict[str, Any]) -> None:
    """A table of the metric summaries (mean, std, min, max, n) on stdout."""
    table = Table(title=f"eval: {result['n_images']} image pairs")
    for col in ("metric", "mean", "std", "min", "max", "n"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, s in result["summary"].items():
        if name == "fid_kid":
            for k2, v in s.items():
                table.add_row(k2, _fmt(v), "", "", "", str(result["n_images"]))
            continue
        n = str(s.get("n", "")) + (f" (+{s['n_inf']} inf)" if s.get("n_inf") else "")
        table.add_row(name, *(_fmt(s.get(c, "")) for c in ("mean", "std", "min", "max")), n)
    to_stdout().print(table)


@app.command("eval", epilog="""Example (toy world, judge + toy CLIP):\n
  dclip-ray eval --before toy/ --after edited/ --source "red circle" --target "blue circle" --clip toy_clip \\
    --judge-colour blue --out edited/eval.json\n
Real model with another CLIP than the training one, FID/KID and identity:
  dclip-ray eval --before faces/ --after out/angry/ --source face --target "angry face" --clip clip_vit_b32 \\
    --clip-weights ViT-B-32.pt --face-weights vggface2.pt --inception-weights pt_inception-2015-12-05-6726825d.pth \\
    --out eval.parquet\n
When --after was made by edit or restyle from shards under --before that changed since, eval refuses
(exit 1): the pairs would compare the edits with other images.""")
def eval_(
    before: str = typer.Option(..., help="Input images (folder or shards); matched to --after by key."),
    after: str = typer.Option(..., help="Edited images (folder or shards, e.g. a restyle variant folder)."),
    source: str = typer.Option(None, help="Source text of the edit (for S_dir)."),
    target: str = typer.Option(None, help="Target text of the edit (for S_dir and the CLIP score)."),
    clip: str = typer.Option(None, help="CLIP preset or open_clip name for S_dir / CLIP score (any CLIP)."),
    clip_weights: str = typer.Option(None, help="Local CLIP weights file (required for non-bundled CLIPs)."),
    face_weights: str = typer.Option(None, help="InceptionResnetV1 weights: adds identity similarity."),
    inception_weights: str = typer.Option(None, help="FID InceptionV3 weights file (.pth): adds FID and KID."),
    judge_colour: str = typer.Option(None, help="Toy world: the colour every edited image should show."),
    judge_shape: str = typer.Option(None, help="Toy world: the shape every edited image should show."),
    size: int = typer.Option(None, help="Compare at this size (default: the edited images' width)."),
    limit: int = typer.Option(None, help="Evaluate at most this many edited images."),
    out: str = typer.Option(None, help="Write the metrics: FILE.json, or FILE.parquet (per image + FILE.json)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
    verbose: bool = typer.Option(False, help="Show warnings."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help=TRUST_HELP),
) -> None:
    """Metrics of an edit: PSNR/SSIM, S_dir, CLIP score, identity, toy judge, FID/KID; per image and summarised."""
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR)
    job = EvalJob(before=before, after=after, source=source, target=target, clip=clip, clip_weights=clip_weights,
                  face_weights=face_weights, inception_weights=inception_weights, judge_colour=judge_colour,
                  judge_shape=judge_shape, size=size, limit=limit, out=out)
    with trust_scope(trust_checkpoint):
        result = evaluate(job)
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "per_image"}, indent=2, default=str))
    else:
        print_eval_summary(result)
        if result.get("out"):
            to_stderr().print(f"metrics written to {result['out']}")
    for err in result["errors"]:
        to_stderr().print(f"[yellow]skipped[/] {err['key']} ({err['shard']}): {err['error']}")
    raise typer.Exit(2 if result["errors"] else 0)


@app.command(epilog="""Examples:\n
  dclip-ray report ft/blue                 # a finetune output: loss curve, configuration\n
  dclip-ray report edited/ --out edited.html\n
  dclip-ray report runs/nightly/           # a pipeline run: models, restyled shards, metrics\n
The page is self-contained (images inlined), so it opens offline and can be mailed or archived.""")
def report(
    run_dir: str = typer.Argument(..., help="A run folder: finetune/edit/translate output or a pipeline run."),
    out: str = typer.Option(None, help="HTML file to write (default: RUN_DIR/report.html)."),
    as_json: bool = typer.Option(False, "--json", help="Print {\"report\": PATH} as JSON."),
) -> None:
    """Write one self-contained HTML report of a run: before/after grids, metrics, loss curves, configuration."""
    path = write_report(run_dir, out=out)
    print(json.dumps({"report": path}) if as_json else path)
