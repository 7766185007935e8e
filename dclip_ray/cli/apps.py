"""`dclip-ray translate`, `from-strokes`, `eval` and `report`: the paper's applications and the evaluation
(parse and call)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from typing import Any

import typer
from rich.table import Table

from dclip_ray.applications import TranslateJob, run_translate
from dclip_ray.config import RunOptions, TranslateSettings
from dclip_ray.evaluation import EvalJob, evaluate
from dclip_ray.evaluation.report import write_report
from dclip_ray.models import trust_scope

from .common import app
from .edit import _emit
from .settings import NO_OPTIONS, config_options, run_options
from .terminal import to_stderr, to_stdout

NO_TRANSLATE = TranslateSettings()


def _translate(kind: str, model: str, images: str, out: str, finetuned: str | None, settings: TranslateSettings,
               opts: RunOptions) -> None:
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.ERROR)
    job = TranslateJob(model=model, images=images, out=out, finetuned=finetuned, kind=kind, preset=opts.preset,
                       score_clip=opts.score_clip, score_clip_weights=opts.score_clip_weights,
                       trust_checkpoint=opts.trust_checkpoint, **asdict(settings))
    with trust_scope(opts.trust_checkpoint):
        summary = run_translate(job, progress=opts.progress)
    raise typer.Exit(_emit(summary, opts.as_json, kind))


_MODEL = "The ORIGINAL base UNet: preset name (toy_shapes), diffusers folder, .ckpt/.pt or URL."
_FT = "Fine-tuned model folder for the final edit (default: none, the original model reconstructs step 1)."
_OPTIONS = run_options("preset", "score_clip", "score_clip_weights", "trust_checkpoint", "as_json", "verbose", "quiet",
                       helps={"preset": "Architecture preset for a raw base checkpoint.",
                              "score_clip": "CLIP that scores every final edit (step 1 -> final, the fine-tuned "
                                            "model's source -> target) into OUT/scores.parquet (default: the CLIP "
                                            "the model was fine-tuned with, from its dclip.json)."})
"""The job options of translate and from-strokes (declared in :class:`dclip_ray.config.RunOptions`)."""


@app.command(epilog="""Example (toy world): shapes on an unseen background -> the toy domain -> edited:\n
  dclip-ray toyworld make-data --out photos/ --n 16 --style photo\n
  dclip-ray translate --model toy_shapes --images photos/ --out translated/ --t0 300 --k 2 --grid\n
  dclip-ray translate --model toy_shapes --finetuned ft/blue --images photos/ --out translated/ --k 2\n
Real model (paper Fig. 4a, e.g. a dog photo -> a face -> a Pixar face):
dclip-ray translate --model celeba_hq.ckpt --preset celeba_hq --finetuned ft/pixar --images dogs/ --out out/ --t0 500 --k 5""")
@config_options(TranslateSettings, "settings", build=True)
@_OPTIONS
def translate(
    model: str = typer.Option(..., help=_MODEL),
    images: str = typer.Option(..., help="Source-domain images: folder, .tar shard(s), brace list or glob."),
    out: str = typer.Option(..., help="Output folder: {key}.png (final), domain/{key}.png (step 1), dclip_run.json."),
    finetuned: str = typer.Option(None, help=_FT),
    settings: TranslateSettings = NO_TRANSLATE,
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Unseen -> unseen translation (paper, Figure 4a): noise to t0, generate into the trained domain (K times),
    then invert and edit with a fine-tuned model."""
    _translate("translate", model, images, out, finetuned, settings, opts)


@app.command("from-strokes", epilog="""Example (toy world): rough colour blobs -> clean shapes -> edited:\n
  dclip-ray toyworld make-data --out paintings/ --n 16 --style strokes\n
  dclip-ray from-strokes --model toy_shapes --images paintings/ --out gen/ --grid\n
  dclip-ray from-strokes --model toy_shapes --finetuned ft/blue --images paintings/ --out gen/ --k 3\n
Measured on the toy world (t0 300, k 2): 62 % of 16 stroke paintings become a clean shape of their colour, 12 % of the
bare paintings pass the same judge.""")
@config_options(TranslateSettings, "settings", build=True, defaults={"k": 2}, helps={
    "t0": "Step t0 the painting is noised to (eq. 1).",
    "k": "Noise + denoise round trips with the original model.",
    "grid": "Also write grid.png (strokes / generated / edited rows)."})
@_OPTIONS
def from_strokes(
    model: str = typer.Option(..., help=_MODEL),
    images: str = typer.Option(..., help="Colour-block paintings (strokes): folder, .tar shard(s), brace list or glob."),
    out: str = typer.Option(..., help="Output folder: {key}.png (final), domain/{key}.png (step 1), dclip_run.json."),
    finetuned: str = typer.Option(None, help=_FT),
    settings: TranslateSettings = NO_TRANSLATE,
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Stroke-conditioned generation (paper, Figure 4b): a rough painting -> a clean image of the trained domain,
    optionally edited by a fine-tuned model."""
    _translate("from-strokes", model, images, out, finetuned, settings, opts)


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
@run_options("clip", "clip_weights", "face_weights", "trust_checkpoint", "as_json", "verbose", helps={
    "clip": "CLIP preset or open_clip name for S_dir / CLIP score (any CLIP).",
    "face_weights": "InceptionResnetV1 weights: adds identity similarity.",
    "as_json": "Print the summary as JSON instead of a table."})
def eval_(
    before: str = typer.Option(..., help="Input images (folder or shards); matched to --after by key."),
    after: str = typer.Option(..., help="Edited images (folder or shards, e.g. a restyle variant folder)."),
    source: str = typer.Option(None, help="Source text of the edit (for S_dir)."),
    target: str = typer.Option(None, help="Target text of the edit (for S_dir and the CLIP score)."),
    inception_weights: str = typer.Option(None, help="FID InceptionV3 weights file (.pth): adds FID and KID."),
    judge_colour: str = typer.Option(None, help="Toy world: the colour every edited image should show."),
    judge_shape: str = typer.Option(None, help="Toy world: the shape every edited image should show."),
    size: int = typer.Option(None, help="Compare at this size (default: the edited images' width)."),
    limit: int = typer.Option(None, help="Evaluate at most this many edited images."),
    out: str = typer.Option(None, help="Write the metrics: FILE.json, or FILE.parquet (per image + FILE.json)."),
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Metrics of an edit: PSNR/SSIM, S_dir, CLIP score, identity, toy judge, FID/KID; per image and summarised."""
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.ERROR)
    job = EvalJob(before=before, after=after, source=source, target=target, clip=opts.clip,
                  clip_weights=opts.clip_weights, face_weights=opts.face_weights, inception_weights=inception_weights,
                  judge_colour=judge_colour, judge_shape=judge_shape, size=size, limit=limit, out=out)
    with trust_scope(opts.trust_checkpoint):
        result = evaluate(job)
    if opts.as_json:
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
@run_options("as_json", helps={"as_json": 'Print {"report": PATH} as JSON.'})
def report(
    run_dir: str = typer.Argument(..., help="A run folder: finetune/edit/translate output or a pipeline run."),
    out: str = typer.Option(None, help="HTML file to write (default: RUN_DIR/report.html)."),
    opts: RunOptions = NO_OPTIONS,
) -> None:
    """Write one self-contained HTML report of a run: before/after grids, metrics, loss curves, configuration."""
    path = write_report(run_dir, out=out)
    print(json.dumps({"report": path}) if opts.as_json else path)
