"""`finetune-many` without Ray: the job's arguments, each prompt's configuration and training images,
the plan of its fine-tunings (restarts x search points, each a :class:`TrainRun`) and the fine-tuning of
one run in whatever process runs it. :mod:`dclip_ray.pipeline.finetune_many` runs the plan on Ray Train;
:mod:`.prompt_models` judges and keeps the models.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from dclip_ray.callbacks import Callback
from dclip_ray.config import QualityCheck, Resources, TrainingSets, resolve_finetune_config
from dclip_ray.errors import ConfigError
from dclip_ray.finetune import FinetuneConfig, finetune
from dclip_ray.hashing import config_sha256
from dclip_ray.io.latents import find_latent_store
from dclip_ray.io.locations import check_outputs
from dclip_ray.losses import directional_clip_loss
from dclip_ray.models.base import resolve_clip
from dclip_ray.models.cache import cached_base
from dclip_ray.models.face import load_face
from dclip_ray.prompts import EditSpec, get_edit_preset, parse_prompt_file
from dclip_ray.quality import DIVERGED, check_model, failed_path, weights_finite
from dclip_ray.search import points_of, with_knobs
from dclip_ray.stages.checks import check_out_folder, check_steps
from dclip_ray.stages.common import device_for, set_threads
from dclip_ray.stages.inputs import absolute, input_shards
from dclip_ray.stages.prompt_models import RESTARTS_SUFFIX, existing, save_model
from dclip_ray.stages.selection import SourceMatcher, select_training_sets
from dclip_ray.stages.training_data import training_data
from dclip_ray.urls import abs_location, redact


@dataclass
class FinetuneManyJob:
    """Arguments of `dclip-ray finetune-many` (see its --help). ``settings``: the job's fine-tuning
    settings (``{FinetuneConfig field: value}``, from the CLI or the workflow spec); a prompt line's own
    options win over them, and what neither gives comes from the model preset or the declared default
    (:func:`dclip_ray.config.resolve_finetune_config`)."""

    prompts: str
    model: str
    out: str
    latents: str | None = None
    images: str | None = None
    preset: str | None = None
    clip: str | None = None
    clip_weights: str | None = None
    face_weights: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    training_sets: TrainingSets = field(default_factory=TrainingSets)  # how each prompt's images are chosen and fitted
    check: QualityCheck = field(default_factory=QualityCheck)  # the held-aside check before a prompt is done
    resources: Resources = field(default_factory=Resources)  # cpus/gpus_per_prompt, max_failures, max_concurrent
    address: str | None = None
    num_cpus: int | None = None
    verbose: bool = False


@dataclass(frozen=True)
class TrainRun:
    """One fine-tuning of a prompt (a restart or a search point): everything the process that trains it
    needs, picklable (Ray Train hands it to its worker as the loop's config)."""

    name: str
    model: str
    preset: str | None
    clip: str | None
    clip_weights: str | None
    face_weights: str | None
    finetune: FinetuneConfig
    images: str | None
    latents: str | None
    policy: str
    keys: list[str] | None  # the prompt's chosen keys: the first n_train train, the next check_images check
    check_images: int
    out_dir: str
    config_sha256: str
    cpus: float
    gpus: float
    training_set: dict[str, Any]
    run_name: str


def finetune_config(spec: EditSpec, job: FinetuneManyJob, preset: Any) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of one prompt line: the line's options, else the job's, else the
    recipe and presets' (:func:`~dclip_ray.config.resolve_finetune_config`), else the declared defaults.
    A line with ``id`` > 0 needs ``--face-weights``."""
    try:
        edit_preset = get_edit_preset(spec.preset) if spec.preset else None
        cfg = resolve_finetune_config(spec.source, spec.target, spec.settings(), job.settings, preset=preset,
                                      edit_preset=edit_preset)
    except ConfigError as e:
        raise ConfigError(f"prompt {spec.name}: {e}") from None
    if cfg.w_id > 0 and not job.face_weights:
        raise ConfigError(f"prompt {spec.name}: the identity loss (id={cfg.w_id:g}) needs --face-weights "
                          "(InceptionResnetV1 weights); pass them or set id=0")
    return cfg


@torch.no_grad()
def quality_score(clip: Any, unet: torch.nn.Module, base: Any, x0: torch.Tensor, latents: torch.Tensor,
                  fcfg: FinetuneConfig, n: int = 8) -> float:
    """Directional CLIP similarity S_dir (in [-1, 1], higher is better) of the fine-tuned model's edits of
    up to ``n`` training images (``x0``, ``latents``: [N,3,H,W]) generated with ``n_gen_steps``."""
    from dclip_ray.diffusion import generate
    from dclip_ray.models import eps_fn_of

    x_gen = generate(eps_fn_of(unet), latents[:n], fcfg.t0, fcfg.n_gen_steps, base.schedule)
    loss = directional_clip_loss(clip, x_gen.clamp(-1, 1), x0[:n], fcfg.source, fcfg.target, form="cosine")
    return float(1.0 - loss.mean())


def train_run(run: TrainRun, checkpoint_dir: str, callbacks: list[Callback], save: bool = True) -> dict[str, float]:
    """Fine-tune one :class:`TrainRun` here (resuming from ``checkpoint_dir`` when it holds a state), check
    the model on its held-aside images and, with ``save``, write it with its card to ``run.out_dir``.
    Returns the numeric metrics (final loss, S_dir, resumed step, seconds)."""
    from dclip_ray.models import eps_fn_of

    started = time.time()
    set_threads(run.cpus)
    device = device_for(run.gpus) if torch.cuda.is_available() else "cpu"
    base = cached_base(run.model, run.preset, device)
    clip = resolve_clip(run.clip, run.clip_weights, base)
    if device != "cpu":
        clip.to(device)
    fcfg = run.finetune
    face = load_face(run.face_weights, device=device) if fcfg.w_id > 0 else None
    keys, x_all, lat_all, origin = training_data(base, fcfg.n_train + run.check_images, fcfg.t0, fcfg.n_inv_steps,
                                                 run.images, run.latents, run.policy, run.keys)
    n = min(fcfg.n_train, len(keys))
    held = len(keys) > n
    keys, x0, latents = keys[:n], x_all[:n].to(device), lat_all[:n].to(device)
    x_check, lat_check = (x_all[n:], lat_all[n:]) if held else (x_all[:run.check_images], lat_all[:run.check_images])
    result = finetune(base.unet, clip, x0, latents, base.schedule, fcfg, face=face, checkpoint_dir=checkpoint_dir,
                      callbacks=callbacks)
    metrics = {"final_loss": result.final_loss,
               "quality_s_dir": quality_score(clip, result.unet, base, x0, latents, fcfg),
               "resumed_from_step": result.resumed_from_step, "train_seconds": round(result.seconds, 2)}
    finite = weights_finite(result.unet) and math.isfinite(result.final_loss)
    measured = None if finite else DIVERGED  # --check-images 0 checks nothing but divergence
    if run.check_images:
        measured = check_model(eps_fn_of(base.unet), eps_fn_of(result.unet), clip, x_check.to(device), fcfg,
                               base.schedule, held, finite, latents=lat_check.to(device))
    if save:
        save_model(result, run.out_dir, fcfg, base, metrics, {
            "base_model": redact(run.model), "clip": clip.name,
            "clip_weights": redact(run.clip_weights) if run.clip_weights else None,
            "train_keys": keys, "latents": origin, "prompt_name": run.name, "training_set": run.training_set,
            "config_sha256": run.config_sha256, "train_window": [started, time.time()],
            **({"quality": {"measured": measured}} if measured else {})})
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def new_checkpoint_dir() -> str:
    """A fresh local folder for a run's checkpoints (Ray Train copies its last checkpoint into it)."""
    return tempfile.mkdtemp(prefix="dclip-ft-")


@dataclass
class Plan:
    """What a finetune-many run does: one summary row per prompt, the :class:`TrainRun` s still to train
    (with their prompt's row), and the prompts whose restarts are all trained and only wait to be judged."""

    rows: list[dict[str, Any]]
    runs: list[tuple[dict[str, Any], TrainRun]]
    judge_only: list[dict[str, Any]]
    warnings: list[str]
    job: FinetuneManyJob
    preset: Any


def plan(job: FinetuneManyJob) -> Plan:
    """Check ``job`` (:class:`ConfigError`, exit 1, before anything is written), resolve each prompt's
    configuration and training images (:func:`choose_training_sets`) and plan its runs (:func:`plan_prompt`)."""
    specs = parse_prompt_file(job.prompts)
    job = replace(job, model=absolute(job.model), latents=absolute(job.latents),
                  images=absolute(job.images), clip_weights=absolute(job.clip_weights),
                  face_weights=absolute(job.face_weights), out=abs_location(job.out))
    base = cached_base(job.model, job.preset)
    clip = check_job(job, base)
    fcfgs = {s.name: prompt_config(s, job, base) for s in specs}
    warnings: list[str] = []
    sets = choose_training_sets(specs, fcfgs, job, base, clip, warnings)
    out = Plan([], [], [], warnings, job, base.preset)
    for spec in specs:
        row, runs = plan_prompt(spec, job, base, fcfgs[spec.name], sets[spec.name])
        out.rows.append(row)
        out.runs += [(row, r) for r in runs]
        if not runs and row["status"] == "pending":  # every restart trained: only the judging is left
            out.judge_only.append(row)
    return out


def summary(p: Plan) -> dict[str, Any]:
    """The run's summary ``{"prompts": rows, "n_ok", "n_failed", "n_skipped", "warnings"}`` (each row:
    name, source, target, status, final_loss, quality_s_dir, model_path, seconds, error, training_set,
    restarts, quality)."""
    warnings = list(p.warnings)
    for r in p.rows:
        if r["status"] == "ok (low quality, accepted)":
            warnings.append(f"prompt {r['name']}: kept although its model failed the check (--accept-low-quality): "
                            f"{r['quality'].get('reason')}")
    return {"prompts": p.rows, "n_ok": sum(r["status"].startswith("ok") for r in p.rows),
            "n_failed": sum(r["status"].startswith("failed") for r in p.rows),
            "n_skipped": sum(r["status"].startswith("skipped") for r in p.rows), "warnings": warnings}


def check_job(job: FinetuneManyJob, base: Any) -> Any:
    """Everything checkable before Ray starts: an input, the output folder apart from the inputs and the
    CLIP (:class:`ConfigError`, exit 1). Returns the CLIP."""
    if job.latents is None and job.images is None:
        raise ConfigError("finetune-many needs --latents URL (from `dclip-ray precompute`) or --images URL")
    check_out_folder(job.out)
    check_outputs({"--out": job.out}, {"--latents": job.latents, "--images": job.images, "--model": job.model,
                                       "the prompt file": job.prompts})
    return resolve_clip(job.clip, job.clip_weights, base)  # fail fast on a missing CLIP, before Ray starts


def prompt_config(spec: EditSpec, job: FinetuneManyJob, base: Any) -> FinetuneConfig:
    """One prompt's :class:`FinetuneConfig`, checked against the base model and the latent store."""
    fcfg = finetune_config(spec, job, base.preset)
    try:
        check_steps(base.schedule, fcfg.t0, fcfg.n_inv_steps, fcfg.n_gen_steps, fcfg.batch_size)
    except ConfigError as e:
        raise ConfigError(f"prompt {spec.name}: {e}") from None
    t0s = sorted({p["t0"] for p in points_of(fcfg, fcfg.search_trials, fcfg.seed)})  # a search varies t0
    for t0 in t0s if job.images is None and spec.images is None else []:
        if _store(job, base, replace(fcfg, t0=t0)) is None:
            why = f" (search={fcfg.search_trials} tries t0 {', '.join(map(str, t0s))})" if len(t0s) > 1 else ""
            raise ConfigError(f"prompt {spec.name}: no cached latents for t0={t0}, n_inv={fcfg.n_inv_steps} under "
                              f"{job.latents}{why}; run `dclip-ray precompute --t0 {t0} --n-inv {fcfg.n_inv_steps}` "
                              "or pass --images")
    return fcfg


def _store(job: FinetuneManyJob, base: Any, fcfg: FinetuneConfig) -> Any:
    return find_latent_store(job.latents or "", base.sha256, fcfg.t0, fcfg.n_inv_steps, base.resolution,
                             job.training_sets.resize_policy) if job.latents else None


def _dataset_shards(job: FinetuneManyJob, base: Any, fcfgs: list[FinetuneConfig]) -> list[str]:
    """The input shards to choose training images from: ``--images``, else the shards the latent
    store's latents came from (in shard order)."""
    if job.images is not None:
        return [p for _, p in input_shards(job.images)]
    for fcfg in fcfgs:
        store = _store(job, base, fcfg)
        if store is not None:
            markers = [store.read_marker(n) or {} for n in store.committed_shards()]
            return [m["source"] for m in markers if m.get("source")]
    return []


def choose_training_sets(specs: list[EditSpec], fcfgs: dict[str, FinetuneConfig], job: FinetuneManyJob, base: Any,
                         clip: Any, warnings: list[str]) -> dict[str, dict[str, Any]]:
    """Per prompt name: ``{"keys": chosen keys or None (the first images), "images": the line's own
    images or None, "by", ...}`` (:mod:`dclip_ray.stages.selection`): the first ``n_train`` keys train,
    up to ``check_images`` more are held aside for the check (``matched``, ``held_aside``). A line with
    ``images=`` takes its own images; with ``select: first`` every other line takes the first images.
    Fewer matches than ``n_train`` is a :class:`ConfigError` naming the prompt, unless ``allow_fewer``
    (a warning)."""
    out: dict[str, dict[str, Any]] = {}
    todo = []
    for s in specs:
        if s.images is not None:
            check_outputs({"--out": job.out}, {f"prompt {s.name}'s images=": s.images})
            out[s.name] = {"keys": None, "images": absolute(s.images), "by": {"images=": 1}}
        elif job.training_sets.select == "first":
            out[s.name] = {"keys": None, "images": None, "by": {"first": 1}}
        else:
            todo.append(s)
    if not todo:
        return out
    matcher = SourceMatcher([fcfgs[s.name].source for s in todo], clip, others=[f.target for f in fcfgs.values()])
    shards = _dataset_shards(job, base, [fcfgs[s.name] for s in todo])
    n_check = job.check.check_images  # matching images beyond n_train are held aside for the check
    sets = select_training_sets([(s.name, fcfgs[s.name].source, fcfgs[s.name].n_train + n_check) for s in todo],
                                shards, base.resolution, job.training_sets.resize_policy, matcher)
    for s in todo:
        ts, n_train = sets[s.name], fcfgs[s.name].n_train
        if len(ts.keys) < n_train:
            how = ", ".join(f"{k}" for k in ts.by) or "caption or zero-shot CLIP"
            msg = (f"prompt {s.name}: {len(ts.keys)} of {ts.scanned} images match its source {ts.source!r} "
                   f"(by {how}); n_train={n_train}")
            if not ts.keys or not job.training_sets.allow_fewer:
                raise ConfigError(msg + "; lower n_train=, give the line images=, or pass --allow-fewer")
            warnings.append(msg + "; training on those (--allow-fewer)")
        out[s.name] = {"keys": ts.keys, "images": None, **ts.summary(first=n_train),
                       "held_aside": max(0, len(ts.keys) - n_train)}
    return out


def plan_prompt(spec: EditSpec, job: FinetuneManyJob, base: Any, fcfg: FinetuneConfig, chosen: dict[str, Any],
                ) -> tuple[dict[str, Any], list[TrainRun]]:
    """One prompt's summary row and its fine-tunings still to run: the ``search_trials`` knob points
    around the recipe, each at seeds ``fcfg.seed .. + restarts - 1`` (:func:`~dclip_ray.search.points_of`;
    each trains into ``OUT/NAME.restarts/I-seed-S``). None to run: a model of this exact config is already
    at ``OUT/NAME`` (``skipped (done)``), or at ``OUT/NAME.failed`` (judged again, never re-trained), or its
    restarts are all trained and only wait to be judged (:func:`~.prompt_models.finish`)."""
    out_dir = f"{job.out.rstrip('/')}/{spec.name}"
    images = chosen["images"] or job.images
    all_keys = chosen["keys"]
    train_keys = all_keys[:fcfg.n_train] if all_keys is not None else None
    ident = {"base": base.sha256, "images": images, "latents": job.latents, "policy": job.training_sets.resize_policy,
             "keys": train_keys}
    h = config_sha256({"finetune": asdict(fcfg), **ident})
    row = {"name": spec.name, "source": fcfg.source, "target": fcfg.target, "status": "pending",
           "final_loss": None, "quality_s_dir": None, "model_path": out_dir, "seconds": 0.0, "error": None,
           "config_sha256": h, "training_set": {k: v for k, v in chosen.items() if k != "keys"},
           "restarts": [], "quality": {}}
    card = existing(out_dir, h)
    if card is not None:
        m = card.get("metrics") or {}
        row.update(status="skipped (done)", final_loss=card.get("final_loss"), quality_s_dir=m.get("quality_s_dir"),
                   quality=card.get("quality") or {})
        return row, []
    if existing(failed_path(out_dir), h) is not None:
        return row, []  # failed before with this config: finish() judges its stored measurement again
    runs = []
    for i, point in enumerate(points_of(fcfg, fcfg.search_trials, fcfg.seed)):
        rcfg = with_knobs(fcfg, point)
        rh = config_sha256({"finetune": asdict(rcfg), **ident, "check": job.check.check_images})
        stage = f"{out_dir}{RESTARTS_SUFFIX}/{i}-seed-{rcfg.seed}"
        row["restarts"].append({**point, "path": stage, "config_sha256": rh})
        if existing(stage, rh) is not None:
            continue
        runs.append(TrainRun(
            name=spec.name, model=job.model, preset=job.preset, clip=job.clip, clip_weights=job.clip_weights,
            face_weights=job.face_weights, finetune=rcfg, images=images, latents=job.latents,
            policy=job.training_sets.resize_policy, keys=all_keys, check_images=job.check.check_images,
            out_dir=stage, config_sha256=rh, cpus=job.resources.cpus_per_prompt, gpus=job.resources.gpus_per_prompt,
            training_set=row["training_set"], run_name=f"{spec.name}-{i}s{rcfg.seed}-{rh[:12]}"))
    return row, runs
