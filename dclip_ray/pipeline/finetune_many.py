"""`dclip-ray finetune-many`: one Ray Train ``TorchTrainer`` per prompt line, several running at once.

Each prompt's ``fit()`` is called from its own zero-CPU Ray task (../shared/REFERENCE.md sec. 5, a
pattern that runs concurrently under Train V2 without deadlock), so as many prompts train at once as
the cluster has room for workers (``--cpus-per-prompt`` / ``--gpus-per-prompt``), the rest queue. The
train loop calls :func:`dclip_ray.finetune.finetune` with a checkpoint folder and reports every
checkpoint to Ray Train, which persists it under ``OUT/_ray_train/{name}-{config hash}``; after a worker failure
(``FailureConfig(max_failures)``) or on a re-run with the same ``--out`` the loop resumes from
``ray.train.get_checkpoint()``. A prompt whose model is already saved with the same configuration is
skipped.
"""

from __future__ import annotations

import math
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import fsspec
import ray
import torch

from dclip_ray.callbacks import Callback, load_callbacks, resolve_factory
from dclip_ray.config import QualityCheck, Resources, TrainingSets, resolve_finetune_config
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.finetune import FinetuneConfig, copy_model, finetune, remove_model, save_finetuned
from dclip_ray.hashing import config_sha256
from dclip_ray.io.locations import check_outputs
from dclip_ray.losses import directional_clip_loss
from dclip_ray.models.base import resolve_clip
from dclip_ray.models.cache import cached_base
from dclip_ray.models.card import read_card
from dclip_ray.models.face import load_face
from dclip_ray.progress import progress as progress_counter
from dclip_ray.prompts import EditSpec, get_edit_preset, parse_prompt_file
from dclip_ray.quality import (
    DIVERGED,
    assess,
    check_model,
    choose,
    failed_path,
    judge,
    status_of,
    weights_finite,
)
from dclip_ray.search import KNOBS, points_of, with_knobs
from dclip_ray.stages.checks import check_out_folder, check_steps
from dclip_ray.stages.common import device_for, set_threads
from dclip_ray.stages.inputs import absolute, input_shards
from dclip_ray.stages.precompute import find_latent_store
from dclip_ray.stages.selection import SourceMatcher, select_training_sets
from dclip_ray.stages.training_data import training_data
from dclip_ray.urls import abs_location, is_remote, local_path, redact

from .runtime import check_local_ray, init_ray


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
    # Extra fine-tuning callbacks for every prompt, as importable "module:factory" strings optionally
    # followed by a JSON object of keyword arguments (dclip_ray.callbacks.resolve_factory); each Train
    # worker builds its own. The module must be importable there (installed, or on the workers' PYTHONPATH);
    # a callback meant for one prompt can read ray.train.get_context().get_experiment_name() ("{name}-{hash}").
    callbacks: list[str] = field(default_factory=list)


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


def _save(result: Any, out_dir: str, fcfg: FinetuneConfig, base: Any, metrics: dict[str, Any],
          extra: dict[str, Any]) -> None:
    if not is_remote(out_dir):
        save_finetuned(result, local_path(out_dir), fcfg, base.unet, base.schedule_config, metrics, extra)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_finetuned(result, tmp, fcfg, base.unet, base.schedule_config, metrics, extra)
        fs, path = fsspec.core.url_to_fs(out_dir)
        names = sorted(os.listdir(tmp), key=lambda n: n == "dclip.json")  # the card (completion mark) last
        for n in names:
            fs.put_file(os.path.join(tmp, n), posixpath.join(path, n))


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


class ReportCheckpoints(Callback):
    """Reports every fine-tuning checkpoint folder, with its numeric metrics, to Ray Train (which
    persists it under the run's storage path and hands it back on a restart)."""

    def on_checkpoint(self, path: Path, metrics: dict[str, float]) -> None:
        import ray.train

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(str(path)))


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train loop of one prompt (runs in the Train worker); ``config["callbacks"]``: extra
    fine-tuning callbacks as ``"module:factory [json kwargs]"`` strings, built here in the worker."""
    import ray.train

    from dclip_ray.models import eps_fn_of

    started = time.time()
    set_threads(config["cpus"])
    device = device_for(config["gpus"]) if torch.cuda.is_available() else "cpu"
    base = cached_base(config["model"], config["preset"], device)
    clip = resolve_clip(config["clip"], config["clip_weights"], base)
    if device != "cpu":
        clip.to(device)
    fcfg = FinetuneConfig(**config["finetune"])
    face = load_face(config["face_weights"], device=device) if fcfg.w_id > 0 else None
    n_check = config.get("check_images", 0)
    keys, x_all, lat_all, origin = training_data(base, fcfg.n_train + n_check, fcfg.t0, fcfg.n_inv_steps,
                                                 config["images"], config["latents"], config["policy"],
                                                 config.get("keys"))
    n = min(fcfg.n_train, len(keys))
    held = len(keys) > n
    keys, x0, latents = keys[:n], x_all[:n].to(device), lat_all[:n].to(device)
    x_check, lat_check = (x_all[n:], lat_all[n:]) if held else (x_all[:n_check], lat_all[:n_check])
    ckpt_dir = tempfile.mkdtemp(prefix="dclip-ft-")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(ckpt_dir)
    result = finetune(base.unet, clip, x0, latents, base.schedule, fcfg, face=face, checkpoint_dir=ckpt_dir,
                      callbacks=[ReportCheckpoints(), *load_callbacks(config["callbacks"])])
    quality = quality_score(clip, result.unet, base, x0, latents, fcfg)
    metrics = {"final_loss": result.final_loss, "quality_s_dir": quality, "resumed_from_step": result.resumed_from_step,
               "train_seconds": round(result.seconds, 2)}
    finite = weights_finite(result.unet) and math.isfinite(result.final_loss)
    measured = None if finite else DIVERGED  # --check-images 0 checks nothing but divergence
    if n_check:
        measured = check_model(eps_fn_of(base.unet), eps_fn_of(result.unet), clip, x_check.to(device), fcfg,
                               base.schedule, held, finite, latents=lat_check.to(device))
    if ray.train.get_context().get_world_rank() == 0:
        _save(result, config["out_dir"], fcfg, base, metrics, {
            "base_model": redact(config["model"]), "clip": clip.name,
            "clip_weights": redact(config["clip_weights"]) if config["clip_weights"] else None,
            "train_keys": keys, "latents": origin, "prompt_name": config["name"],
            "training_set": config.get("training_set"),
            "config_sha256": config["config_sha256"], "train_window": [started, time.time()],
            **({"quality": {"measured": measured}} if measured else {})})
    ray.train.report({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})


@ray.remote(num_cpus=0)
def _fit(name: str, loop_config: dict[str, Any], storage: str, max_failures: int, cpus: float, gpus: float,
         ) -> dict[str, Any]:
    """Run one prompt's TorchTrainer to the end (a zero-CPU task: only the Train worker holds resources)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    backend = "nccl" if device_for(gpus) == "cuda" else "gloo"  # a GPU rehearsed on the CPU has no NCCL
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config, torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage, name=name, failure_config=FailureConfig(max_failures=max_failures)),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001  (reported in the summary; the run resumes on a re-run)
        return {"name": name, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500],
                "seconds": round(time.perf_counter() - start, 1)}
    if result.error is not None:
        return {"name": name, "status": "failed", "error": str(result.error)[:500],
                "seconds": round(time.perf_counter() - start, 1)}
    return {"name": name, "status": "ok", "metrics": dict(result.metrics or {}),
            "seconds": round(time.perf_counter() - start, 1)}


def _storage_path(out: str) -> str:
    if is_remote(out):
        return f"{out.rstrip('/')}/_ray_train"
    return os.path.abspath(os.path.join(local_path(out), "_ray_train"))


def _existing(out_dir: str, config_hash: str) -> dict[str, Any] | None:
    """The card of a model already trained into ``out_dir`` with this config (None: train it; a damaged
    card is trained anew)."""
    try:
        card = read_card(out_dir)
    except InputFileError:
        return None
    return card.data if card.data.get("config_sha256") == config_hash else None


def run_finetune_many(job: FinetuneManyJob, progress: bool = True) -> dict[str, Any]:
    """Fine-tune one model per prompt line of ``job.prompts`` on Ray Train, each on the images chosen
    for its source (:func:`choose_training_sets`); returns the summary ``{"prompts": [{"name",
    "source", "target", "status", "final_loss", "quality_s_dir", "model_path", "seconds", "error",
    "training_set"}], "n_ok", "n_failed", "n_skipped", "warnings"}``."""
    specs = parse_prompt_file(job.prompts)
    job = replace(job, model=absolute(job.model), latents=absolute(job.latents),
                  images=absolute(job.images), clip_weights=absolute(job.clip_weights),
                  face_weights=absolute(job.face_weights),
                  out=abs_location(job.out))
    base = cached_base(job.model, job.preset)
    clip = _check_job(job, base)
    fcfgs = {s.name: _prompt_config(s, job, base) for s in specs}
    warnings: list[str] = []
    sets = choose_training_sets(specs, fcfgs, job, base, clip, warnings)
    rows, launches, judge_only = [], [], []
    for spec in specs:
        row, loops = _plan_prompt(spec, job, base, fcfgs[spec.name], sets[spec.name])
        rows.append(row)
        launches += [(row, loop) for loop in loops]
        if not loops and row["status"] == "pending":  # every restart trained: only the judging is left
            judge_only.append(row)
    if launches:
        check_local_ray(job.address)  # refused before a model is written
    for row in judge_only:
        _finish(row, job, base.preset)
    if launches:
        _train(job, launches, progress)
    for r in rows:
        if r["status"] == "ok (low quality, accepted)":
            warnings.append(f"prompt {r['name']}: kept although its model failed the check (--accept-low-quality): "
                            f"{r['quality'].get('reason')}")
    return {"prompts": rows, "n_ok": sum(r["status"].startswith("ok") for r in rows),
            "n_failed": sum(r["status"].startswith("failed") for r in rows),
            "n_skipped": sum(r["status"].startswith("skipped") for r in rows), "warnings": warnings}


def _check_job(job: FinetuneManyJob, base: Any) -> Any:
    """Everything checkable before Ray starts: an input, the output folder apart from the inputs, the CLIP
    and the callbacks resolve (:class:`ConfigError`, exit 1). Returns the CLIP."""
    if job.latents is None and job.images is None:
        raise ConfigError("finetune-many needs --latents URL (from `dclip-ray precompute`) or --images URL")
    check_out_folder(job.out)
    check_outputs({"--out": job.out}, {"--latents": job.latents, "--images": job.images, "--model": job.model,
                                       "the prompt file": job.prompts})
    clip = resolve_clip(job.clip, job.clip_weights, base)  # fail fast on a missing CLIP, before Ray starts
    for cb in job.callbacks:
        resolve_factory(cb)  # and on a callback that does not resolve
    return clip


def _prompt_config(spec: EditSpec, job: FinetuneManyJob, base: Any) -> FinetuneConfig:
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


def _plan_prompt(spec: EditSpec, job: FinetuneManyJob, base: Any, fcfg: FinetuneConfig, chosen: dict[str, Any],
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One prompt's summary row and the Train loop configs of its fine-tunings still to run: the
    ``search_trials`` knob points around the recipe, each at seeds ``fcfg.seed .. + restarts - 1``
    (:func:`~dclip_ray.search.points_of`; each trains into ``OUT/NAME.restarts/I-seed-S``). None to run: a model
    of this exact config is already at ``OUT/NAME`` (``skipped (done)``), or at ``OUT/NAME.failed`` (judged
    again, never re-trained), or its restarts are all trained and only wait to be judged (:func:`_finish`,
    called at once)."""
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
    card = _existing(out_dir, h)
    if card is not None:
        m = card.get("metrics") or {}
        row.update(status="skipped (done)", final_loss=card.get("final_loss"), quality_s_dir=m.get("quality_s_dir"),
                   quality=card.get("quality") or {})
        return row, []
    if _existing(failed_path(out_dir), h) is not None:
        return row, []  # failed before with this config: _finish judges its stored measurement again
    loops = []
    for i, point in enumerate(points_of(fcfg, fcfg.search_trials, fcfg.seed)):
        rcfg = with_knobs(fcfg, point)
        rh = config_sha256({"finetune": asdict(rcfg), **ident, "check": job.check.check_images})
        stage = f"{out_dir}{RESTARTS_SUFFIX}/{i}-seed-{rcfg.seed}"
        row["restarts"].append({**point, "path": stage, "config_sha256": rh})
        if _existing(stage, rh) is not None:
            continue
        loops.append({"name": spec.name, "model": job.model, "preset": job.preset, "clip": job.clip,
                      "clip_weights": job.clip_weights, "face_weights": job.face_weights, "finetune": asdict(rcfg),
                      "images": images, "latents": job.latents, "policy": job.training_sets.resize_policy, "keys": all_keys,
                      "check_images": job.check.check_images, "out_dir": stage, "config_sha256": rh,
                      "cpus": job.resources.cpus_per_prompt, "gpus": job.resources.gpus_per_prompt,
                      "callbacks": list(job.callbacks), "training_set": row["training_set"],
                      "run_name": f"{spec.name}-{i}s{rcfg.seed}-{rh[:12]}"})
    return row, loops


RESTARTS_SUFFIX = ".restarts"
"""A prompt's restarts train into ``OUT/NAME.restarts/seed-S``; the kept one moves to ``OUT/NAME`` (or
``OUT/NAME.failed``) and the folder is removed."""


def _measured(card: dict[str, Any] | None) -> dict[str, Any] | None:
    return ((card or {}).get("quality") or {}).get("measured")


def _finish(row: dict[str, Any], job: FinetuneManyJob, preset: Any) -> None:
    """Judge a prompt whose restarts have all ended (:mod:`dclip_ray.quality`): keep the best that passes
    the check (else the best: ``failed (quality)`` unless ``--accept-low-quality``), move it to
    ``OUT/NAME`` (``OUT/NAME.failed`` when it fails), its card listing every restart, and remove the
    restarts. A prompt whose model already failed with this config (``OUT/NAME.failed``) is judged again
    from its card (a changed bar or ``--accept-low-quality`` needs no re-training)."""
    out_dir, h = row["model_path"], row["config_sha256"]
    bar, min_spread = job.check.bar(preset), job.check.min_spread
    trained = [(r, c) for r in row["restarts"] if (c := _existing(r["path"], r["config_sha256"])) is not None]
    failed_card = _existing(failed_path(out_dir), h)
    kept = None
    if trained:
        verdicts = [judge(_measured(c), bar, min_spread) for _, c in trained]
        best = choose(verdicts)
        kept, src, card = row["restarts"].index(trained[best][0]), trained[best][0]["path"], dict(trained[best][1])
        rows = [{**{k: r[k] for k in (*KNOBS, "seed")}, **{k: (_measured(c) or {}).get(k) for k in
                                       ("score", "direction", "structure", "background", "spread")},
                 "final_loss": c.get("final_loss"), "passed": v.passed, "reason": v.reason}
                for (r, c), v in zip(trained, verdicts, strict=True)]
        rows += [{**{k: r[k] for k in (*KNOBS, "seed")}, "passed": False, "reason": f"training failed: {r['error']}"}
                 for r in row["restarts"] if r.get("error")]  # a crashed run is one candidate fewer, on record
    elif failed_card is not None:  # judged before: judge its stored measurement again
        src, card, rows = failed_path(out_dir), dict(failed_card), failed_card.get("restarts") or []
        kept = failed_card.get("kept_restart")
    else:
        errors = "; ".join(r["error"] for r in row["restarts"] if r.get("error"))
        row.update(status="failed", error=errors or "no restart produced a model")
        return
    measured = _measured(card)
    quality = assess(measured, job.check, preset)
    status = status_of(quality)
    dst = failed_path(out_dir) if status == "failed (quality)" else out_dir
    card.update(config_sha256=h, quality=quality, restarts=rows, kept_restart=kept)
    copy_model(src, dst, card)
    if src != dst and src == failed_path(out_dir):
        remove_model(src)
    remove_model(f"{out_dir}{RESTARTS_SUFFIX}")
    if dst == out_dir:
        remove_model(failed_path(out_dir))  # an earlier failure of this prompt is stale now
    m = card.get("metrics") or {}
    row.update(status=status, final_loss=card.get("final_loss"), quality_s_dir=m.get("quality_s_dir"),
               quality=quality, restarts=rows, resumed_from_step=m.get("resumed_from_step"),
               train_window=card.get("train_window"), model_path=dst,
               error=quality.get("reason") if status == "failed (quality)" else None)


def _train(job: FinetuneManyJob, launches: list[tuple[dict[str, Any], dict[str, Any]]], progress: bool) -> None:
    """Run the Train loops (one per restart), at most ``max_concurrent`` at once, recording each restart's
    end in its prompt's row; a prompt is judged (:func:`_finish`) when its last restart ends."""
    init_ray(job.address, job.num_cpus, dashboard=True, verbose=job.verbose)
    storage = _storage_path(job.out)
    limit = job.resources.max_concurrent or len(launches)
    queue = list(launches)
    running: dict[Any, tuple[dict[str, Any], dict[str, Any]]] = {}
    left = {}
    for row, _ in launches:
        left[row["name"]] = left.get(row["name"], 0) + 1
    with progress_counter(len(launches), "finetune-many", enabled=progress, unit="fine-tunings") as bar:
        while queue or running:
            while queue and len(running) < limit:
                row, loop = queue.pop(0)
                ref = _fit.remote(loop["run_name"], loop, storage, job.resources.max_failures,
                                  job.resources.cpus_per_prompt, job.resources.gpus_per_prompt)
                running[ref] = (row, loop)
                row["status"] = "running"
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                row, loop = running.pop(ref)
                res = ray.get(ref)
                restart = next(r for r in row["restarts"] if r["path"] == loop["out_dir"])
                if res["status"] == "ok" and _existing(loop["out_dir"], loop["config_sha256"]) is None:
                    res = {**res, "status": "failed", "error": "training ended but the model card was not written"}
                restart.update(status=res["status"], error=res.get("error"), seconds=res["seconds"])
                row["seconds"] = max(row["seconds"], res["seconds"])
                left[row["name"]] -= 1
                if left[row["name"]] == 0:
                    _finish(row, job, job_preset(job))
                bar.update(1)


def job_preset(job: FinetuneManyJob) -> Any:
    """The model preset of the job's base model (its quality bar), None for a model without one."""
    from dclip_ray.models import get_preset, is_preset

    name = job.preset or job.model
    return get_preset(name) if is_preset(name) else None
