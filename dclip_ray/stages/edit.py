"""`dclip-ray edit`: restyle on one machine (no Ray).

The same unit of work as `dclip-ray restyle` (:class:`~dclip_ray.stages.restyle.ShardRestyler`), run
in-process over the input's shards (a folder of images is one shard): the same decoding, inversion,
generation, error rows, manifest, commit marker, resume and exactly-once. Layout::

    OUT/{key}.png              one file per edited image (what edit users read), plus OUT/grid.png (--grid)
                               (the summary the report reads, inputs, models and settings, is
                               .OUT.edit/dclip_run.json);
                               an edit scored under --min-score is not there (its row says why)
    .OUT.edit/ (beside OUT)    the shard outputs restyle writes: {shard}.tar, {shard}.parquet (a row for
                               every input key) and {shard}_stats.json last; a re-run skips committed
                               shards (hidden, so OUT holds only the images and the report skips it)

A key that names several samples of the input (two shards with the same keys, or ``a.png`` and
``a.jpg`` in one folder) is an error row and none of its samples is used.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dclip_ray.config import RestyleSettings
from dclip_ray.cpu import use_free_cores
from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.io.images import load_image_tensor
from dclip_ray.io.locations import check_outputs
from dclip_ray.io.manifest import read_manifest
from dclip_ray.io.shards import ShardWriter, key_problem, shard_urls
from dclip_ray.io.sources import duplicate_reason
from dclip_ray.mixing import MixSpec, load_mix_spec
from dclip_ray.models.base import BaseModel, check_base_model, edit_t0
from dclip_ray.models.cache import cached_base
from dclip_ray.models.card import ModelCard, read_card
from dclip_ray.progress import progress as progress_counter

from .checks import check_steps
from .inputs import absolute, decode_shard, input_shards, limit_shards, shard_keys
from .restyle import RestyleConfig, ShardRestyler, Variant, score_summary
from .restyle_config import check_scoring, mix_variant

log = logging.getLogger(__name__)


@dataclass
class EditJob:
    """Arguments of `dclip-ray edit` (see its --help): what to edit with, where, and the
    :class:`RestyleSettings` (``limit``: at most this many images; the images are written as PNG)."""

    model: str
    finetuned: str | None
    images: str
    out: str
    preset: str | None = None
    mix: str | None = None  # a mix YAML (models + gamma, eq. 14) instead of one fine-tuned model
    settings: RestyleSettings = field(default_factory=RestyleSettings)
    grid: bool = False
    score_clip: str | None = None  # the CLIP that scores each edit (default: the one the models name)
    score_clip_weights: str | None = None
    face_weights: str | None = None  # a face identity network: the scores gain the identity cosine


def state_dir(out: str) -> str:
    """Where edit keeps its shard outputs: the hidden folder ``.NAME.edit`` beside ``OUT`` = ``.../NAME``."""
    p = Path(out).absolute()
    return str(p.parent / f".{p.name}.edit")


RESERVED = {"grid": "grid.png"}
"""Keys whose ``{key}.png`` would be a file edit writes itself (``--grid``): never an edited image."""


class FolderWriter(ShardWriter):
    """A :class:`ShardWriter` that also writes every ok sample's image as ``FOLDER/{key}.png`` (the file
    of a key dropped later is removed). ``claims`` (shared by the writers of one edit: path -> key)
    makes a key whose file another key already took an error row, never an overwrite."""

    def __init__(self, root: str, shard: str, folder: Path, claims: dict[str, str] | None = None):
        super().__init__(root, shard)
        self.folder = folder
        self.claims = {} if claims is None else claims

    def _clash(self, key: str) -> str | None:
        if key in RESERVED:
            return f"key {key!r} would be overwritten by edit's own {RESERVED[key]}; rename it"
        path = posixpath.normpath(key)
        other = self.claims.get(path)
        if other is not None and other != key:
            return f"key {key!r} names the same file as key {other!r} ({path}.png); rename one"
        return None

    def write(self, key: str, members: Any, row: Any) -> bool:
        """Write the sample's PNG, then add it to the shard (neither when the key cannot be stored, is
        reserved, names the file of another key, or its file cannot be created: then an error row)."""
        problem = self._clash(key) or key_problem(key, members)
        if problem:
            self.error(key, problem)
            return False
        path = self.folder / f"{posixpath.normpath(key)}.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(members["png"])
        except OSError as e:  # e.g. key "x.png/y" beside key "x": a file where a folder must be
            self.error(key, f"cannot write {path.relative_to(self.folder)} ({type(e).__name__}: {e.strerror or e}); "
                            "rename the key")
            return False
        self.claims[posixpath.normpath(key)] = key
        return super().write(key, members, row)

    def reject(self, key: str, members: Any, row: Any) -> bool:
        """Keep a rejected sample in the shard's rejected tar; no PNG in the folder (a re-sort by another
        threshold removes the one it had)."""
        kept = super().reject(key, members, row)
        (self.folder / f"{key}.png").unlink(missing_ok=True)
        return kept

    def drop(self, keys: Any) -> None:
        """Drop ``keys`` from the shard and their PNGs (only the files these keys wrote)."""
        super().drop(keys)
        for k in keys:
            path = posixpath.normpath(k)
            if self.claims.get(path) == k:
                del self.claims[path]
                try:
                    (self.folder / f"{path}.png").unlink(missing_ok=True)
                except OSError:
                    pass


class EditRestyler(ShardRestyler):
    """The restyle unit of work writing each edited image into a folder as well (:class:`FolderWriter`)."""

    def __init__(self, cfg: RestyleConfig, folder: Path):
        super().__init__(cfg)
        self.folder = folder
        self.claims: dict[str, str] = {}  # the PNG files this run wrote (normalised key -> key)

    def new_writer(self, v: Variant, shard: str) -> ShardWriter:
        """A :class:`FolderWriter` into the edit's ``--out``."""
        return FolderWriter(v.out, shard, self.folder, self.claims)


def _variant(job: EditJob, mix: MixSpec | None, state: str, cards: list[ModelCard], t0: int) -> Variant:
    r = job.settings.strength
    if mix is None:
        return Variant("edit", state, [0, 1], {"type": "constant", "weights": [1.0 - r, r]}, t0,
                       {"model": job.finetuned, "strength": r}, edits=cards[0].edits)
    return mix_variant(mix, state, r, cards, lambda _: t0)


def _t0(job: EditJob, base: BaseModel, folders: list[str], cards: list[ModelCard]) -> int:
    """The edit's t0 by the one rule (:func:`edit_t0`); warns about a base-model mismatch."""
    check_base_model(base.sha256, job.model, dict(zip(folders, cards, strict=True)))
    return edit_t0(job.settings.t0, cards, base.preset)


def duplicates(shards: list[tuple[str, str]]) -> dict[str, dict[str, str]]:
    """Keys naming several samples across ``shards``: ``{key: {"key", "shard", "error"}}``."""
    homes: dict[str, list[str]] = {}
    for _, path in shards:
        for key in shard_keys(path)[0]:  # a truncated shard's keys up to the cut (the restyle reports the cut)
            homes.setdefault(key, []).append(path)
    return {k: {"key": k, "shard": ", ".join(dict.fromkeys(p)), "error": duplicate_reason(k, len(p), "the input")}
            for k, p in homes.items() if len(p) > 1}


def _errors(state: str, shards: list[tuple[str, str]], dups: dict[str, dict[str, str]],
            ) -> tuple[list[str], list[dict[str, str]], list[dict[str, Any]]]:
    """From the committed manifests: the ok keys in input order, one ``{"key", "shard", "error"}``
    entry per failed key (``shard``: the input shard's path) and one ``{"key", "score", "reason"}`` per
    rejected edit."""
    ok, errors, rejected, seen = [], [], [], set()
    for name, path in shards:
        for row in read_manifest(shard_urls(state, name)["manifest"]):
            if row.status == "ok":
                ok.append(row.key)
            elif row.status == "rejected":
                rejected.append({"key": row.key, "score": row.scores.get("score"), "reason": row.error})
            elif row.key not in seen:
                seen.add(row.key)
                errors.append(dups.get(row.key) or {"key": row.key, "shard": path, "error": str(row.error)})
    return ok, errors, rejected


def _grid(out: Path, shards: list[tuple[str, str]], ok: list[str], size: int) -> str:
    """``OUT/grid.png``: the first 16 edited images under their inputs."""
    from dclip_ray.evaluation.report import save_grid

    wanted, before = set(ok[:16]), {}
    for _, path in shards:
        for d in decode_shard(path, size):
            if d.rec.key in wanted and d.x is not None:
                before.setdefault(d.rec.key, d.x)
    keys = [k for k in ok[:16] if k in before]
    after = [load_image_tensor((out / f"{k}.png").read_bytes(), size) for k in keys]
    return str(save_grid([torch.stack([before[k] for k in keys]), torch.stack(after)], out / "grid.png"))


def run_edit(job: EditJob, progress: bool = True) -> dict[str, Any]:
    """Invert with the original model, generate with ``strength`` r of the fine-tuned one (or of the
    gamma-weighted mix of several, eq. 14, when ``job.mix`` is given), write ``OUT/{key}.png``.

    ``n_edited`` counts the files written; a generated image that is non-finite or one colour is not
    written but listed in ``errors``, as are duplicate and bad inputs."""
    if (job.finetuned is None) == (job.mix is None):
        raise ConfigError("edit needs exactly one of --finetuned FT_DIR or --mix MIX.yaml")
    check_outputs({"--out": job.out, "--out (its shard outputs)": state_dir(job.out)},
                  {"--images": job.images, "--model": job.model, "--finetuned": job.finetuned, "--mix": job.mix})
    use_free_cores()
    base = cached_base(job.model, job.preset)
    mix = load_mix_spec(job.mix) if job.mix else None
    folders = list(mix.models) if mix else [str(job.finetuned)]
    cards = [read_card(f) for f in folders]  # each read once
    t0 = _t0(job, base, folders, cards)
    rs = job.settings
    if rs.image_format != "png" or rs.route == "source":
        raise ConfigError("edit writes PNG files of every image it is given; --format and --route are for "
                          "`dclip-ray restyle`")
    check_steps(base.schedule, t0, rs.n_inv_steps, rs.n_gen_steps, rs.batch_size)  # before any work
    state, out = state_dir(job.out), Path(job.out)
    variant = _variant(job, mix, state, cards, t0)
    cfg = _config(job, folders, variant, state, cards)
    shards = limit_shards(input_shards(job.images), rs.limit)
    dups = duplicates(shards)
    excluded = {k: d["error"] for k, d in dups.items()}
    out.mkdir(parents=True, exist_ok=True)
    restyler = EditRestyler(cfg, out)
    n_keys = sum(len(shard_keys(p)[0]) for _, p in shards) if progress else 0
    with progress_counter(n_keys, "edit", enabled=progress, unit="img") as bar:
        restyler.on_batch = bar.update  # per batch: an edit of one folder is one shard
        results = [restyler.run(name, path, exclude=excluded) for name, path in shards]
    ok, errors, rejected = _outcome(job, state, shards, results, dups)
    for e in errors:
        log.warning("not edited %s: %s", e["key"], e["error"])
    summary: dict[str, Any] = {"out": str(out), "n_edited": len(ok), "t0": t0, "strength": rs.strength,
                               "n_inv_steps": rs.n_inv_steps, "n_gen_steps": rs.n_gen_steps, "errors": errors,
                               "shards": state, "n_rejected": len(rejected), "rejected": rejected}
    if cfg.scores(variant):
        summary["scores"] = {**score_summary(cfg, [n for n, _ in shards])["edit" if mix is None else "mix"]}
    if mix:
        summary["mix"] = mix.as_dict()
    removed = _remove_stale(out, ok, state, [n for n, _ in input_shards(job.images) if n not in dict(shards)])
    if removed:
        summary["n_removed_stale"] = removed
    if job.grid and ok:
        summary["grid"] = _grid(out, shards, ok, base.resolution)
    _write_run_file(out, job, mix, summary)
    return summary


def _config(job: EditJob, folders: list[str], variant: Variant, state: str, cards: list[Any]) -> RestyleConfig:
    """The one-variant :class:`RestyleConfig` of an edit (scored with ``--score-clip``, else the models'
    own CLIP; a scoring that cannot run is a warning)."""
    rs = job.settings
    cfg = RestyleConfig(base=job.model, finetuned=folders, variants=[variant],
                        n_inv_steps=rs.n_inv_steps, n_gen_steps=rs.n_gen_steps, preset=job.preset,
                        resize_policy=rs.resize_policy, batch_size=rs.batch_size, root=state,
                        score_clip=job.score_clip or cards[0].clip,
                        score_clip_weights=job.score_clip_weights if job.score_clip else cards[0].clip_weights,
                        min_score=rs.min_score, face_weights=job.face_weights, cards=cards)
    for w in check_scoring(cfg):
        log.warning("%s", w)
    return cfg


def _outcome(job: EditJob, state: str, shards: list[tuple[str, str]], results: list[Any],
             dups: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(keys written, errors, rejected)`` of the edit: an unreadable input shard is one error naming it;
    no usable image at all is an :class:`InputFileError` (a bad ``--images``)."""
    unreadable = {r.shard: r.truncated for r in results if r.truncated}
    ok, errors, rejected = _errors(state, [(n, p) for n, p in shards if n not in unreadable], dups)
    errors += [{"key": "*", "shard": p, "error": f"the input shard cannot be read to its end ({unreadable[n]}); "
                "nothing of it is edited: fix or replace the file, then re-run"} for n, p in shards if n in unreadable]
    if not ok and not rejected and not unreadable and all(not e["error"].startswith(("non-finite", "blank"))
                                                          for e in errors):
        raise InputFileError(f"{job.images}: no usable image ({len(errors)} errors); check the --images input")
    return ok, errors, rejected


WRITTEN = "written.json"
"""In ``.OUT.edit/``: the keys whose ``OUT/{key}.png`` edit has written, so a re-run removes exactly its own
stale files (never a file it did not write)."""


def _remove_stale(out: Path, ok: list[str], state: str, others: list[str]) -> int:
    """Remove the ``OUT/{key}.png`` files an earlier run wrote that no input key stands behind any more
    (the key left the input, or its edit now fails or is rejected): ``ok`` keys of this run's shards,
    and of the committed manifests of the input shards it did not touch (``others``, left out by
    ``--limit``), keep theirs. Files edit did not write are never touched. Returns the number removed."""
    keep = {posixpath.normpath(k) for k in ok}
    for name in others:
        try:
            keep |= {posixpath.normpath(r.key) for r in read_manifest(shard_urls(state, name)["manifest"])
                     if r.status == "ok"}
        except (InputFileError, OSError):
            continue
    record = Path(state) / WRITTEN
    try:
        before = set(json.loads(record.read_text()))
    except (OSError, ValueError, TypeError):
        before = set()
    removed = 0
    for key in sorted(before - keep):
        if key not in RESERVED and (out / f"{key}.png").is_file():
            (out / f"{key}.png").unlink()
            removed += 1
    text = json.dumps(sorted(keep))
    if not record.is_file() or record.read_text() != text:  # a re-run that changed nothing rewrites nothing
        tmp = record.with_name(WRITTEN + ".tmp")
        tmp.write_text(text)
        tmp.replace(record)
    return removed


def _write_run_file(out: Path, job: EditJob, mix: MixSpec | None, summary: dict[str, Any]) -> None:
    """``.OUT.edit/dclip_run.json`` (beside OUT, which holds only the images): what the report needs to pair
    the images with their inputs and show the model(s) they were made with (the per-shard state and the
    error list stay in the shard outputs)."""
    from dclip_ray.evaluation.report import RUN_FILE
    from dclip_ray.plain import dumps

    config = {**asdict(job), "images": absolute(job.images), "finetuned": absolute(job.finetuned),
              "models": [absolute(m) for m in (mix.models if mix else [job.finetuned])]}
    brief = {k: v for k, v in summary.items() if k not in ("shards", "errors", "rejected")}
    state = Path(state_dir(str(out)))
    text = dumps({"kind": "edited images", **brief, "n_errors": len(summary["errors"]), "config": config})
    if (state / RUN_FILE).is_file() and (state / RUN_FILE).read_text() == text:
        return  # a re-run that changed nothing rewrites nothing
    tmp = state / f"{RUN_FILE}.tmp"
    tmp.write_text(text)
    tmp.replace(state / RUN_FILE)
