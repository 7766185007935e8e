"""`dclip-ray eval`: metrics of an edited set against its inputs, per image and summarised (no Ray).

Images of ``before`` and ``after`` (folders or shards, local or fsspec) are matched by key; keys present
in only one of them are counted, not scored. Results go to a JSON file (``{"summary", "per_image"}``)
or a Parquet table (one row per key, plus the summary beside it as ``<name>.json``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.io.images import ImageError, decode_image, load_image_tensor
from dclip_ray.io.locations import check_replaceable
from dclip_ray.io.sources import iter_records
from dclip_ray.models import load_clip, load_face
from dclip_ray.urls import abs_location

from . import metrics as M

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
"""Default file name of an evaluation summary (the report looks for it)."""


@dataclass
class EvalJob:
    """Arguments of `dclip-ray eval` (see its --help)."""

    before: str
    after: str
    source: str | None = None
    target: str | None = None
    clip: str | None = None
    clip_weights: str | None = None
    face_weights: str | None = None
    inception_weights: str | None = None
    judge_colour: str | None = None
    judge_shape: str | None = None
    size: int | None = None
    limit: int | None = None
    out: str | None = None
    batch_size: int = 32


def _read(url: str, size: int, limit: int | None, only: set[str] | None = None,
          ) -> tuple[dict[str, torch.Tensor], list[dict], int]:
    images: dict[str, torch.Tensor] = {}
    errors: list[dict] = []
    n_seen = 0
    for rec in iter_records(url):
        if limit is not None and len(images) >= limit:
            break
        n_seen += 1
        if only is not None and rec.key not in only:
            continue  # not decoded: only the keys of the other set are needed
        if rec.error is None:
            try:
                images[rec.key] = load_image_tensor(rec.image or b"", size)
                continue
            except ImageError as e:
                rec.error = str(e)
        errors.append({"key": rec.key, "shard": rec.shard, "error": rec.error})
    return images, errors, n_seen


def _first_size(url: str) -> int:
    for rec in iter_records(url):
        if rec.error is None:
            try:
                return int(decode_image(rec.image or b"").size[0])
            except ImageError:
                continue
    raise InputFileError(f"{url}: no readable image to evaluate; check --after")


def load_pairs(before: str, after: str, size: int | None = None, limit: int | None = None,
               ) -> tuple[list[str], torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read both sets and match them by key: ``(keys, before [N,3,S,S], after [N,3,S,S], info)`` in [-1,1].

    ``size`` S (center crop) defaults to the width of ``after``'s first image. Only the ``before`` images
    whose key is in ``after`` are decoded (all pairs are held in memory: use ``limit`` for large sets).
    ``info`` counts the keys found in only one set and lists unreadable images with their reasons.
    """
    size = size or _first_size(after)
    xa, err_a, _ = _read(after, size, limit)
    xb, err_b, n_before = _read(before, size, None, only=set(xa))
    keys = [k for k in xa if k in xb]
    if not keys:
        raise InputFileError(f"no key of {after} is in {before}: the sets must share image keys (file names)")
    info = {"n_before": n_before, "n_after": len(xa), "n_only_after": len(set(xa) - set(xb)),
            "n_only_before": n_before - len(xb), "size": size, "errors": err_a + err_b}
    return keys, torch.stack([xb[k] for k in keys]), torch.stack([xa[k] for k in keys]), info


def _batched(fn: Any, *xs: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(*(x[i : i + batch_size] for x in xs)) for i in range(0, xs[0].shape[0], batch_size)])


def evaluate(job: EvalJob) -> dict[str, Any]:
    """Compute every metric the job's arguments allow; write ``job.out`` if given; return
    ``{"summary": {metric: {mean, std, min, max, n}, ...}, "per_image": [{key, metric: value}], ...}``."""
    if job.out:  # before any work: never replace a file this command did not write
        _check_out(job.out)
    if (job.source is None) != (job.target is None):
        raise ConfigError("give both --source and --target (the edit's text pair) or neither")
    if job.target is not None and job.clip is None:
        raise ConfigError("S_dir and the CLIP score need --clip (a CLIP preset or open_clip name, with --clip-weights)")
    check_same_inputs(job.before, job.after)
    inception = M.load_inception(job.inception_weights) if job.inception_weights else None  # fail fast
    keys, before, after, info = load_pairs(job.before, job.after, job.size, job.limit)
    bs = job.batch_size
    per: dict[str, list[float]] = {
        "psnr": M.psnr(after, before).tolist(),
        "ssim": _batched(M.ssim, after, before, batch_size=bs).tolist(),
        "mean_abs_change": (after - before).abs().flatten(1).mean(1).tolist(),
    }
    used: dict[str, Any] = {}
    if job.clip is not None:
        clip = load_clip(job.clip, weights=job.clip_weights)
        used["clip"] = clip.name
        if job.source is not None and job.target is not None:
            per["s_dir"] = _batched(lambda b, a: M.directional_similarity(clip, b, a, job.source, job.target),
                                    before, after, batch_size=bs).tolist()
            per["clip_score_after"] = _batched(lambda a: M.clip_score(clip, a, job.target), after,
                                               batch_size=bs).tolist()
            per["clip_score_before"] = _batched(lambda b: M.clip_score(clip, b, job.target), before,
                                                batch_size=bs).tolist()
    if job.face_weights:
        face = load_face(job.face_weights)
        per["identity"] = _batched(lambda b, a: M.identity_similarity(face, b, a), before, after,
                                   batch_size=bs).tolist()
    if job.judge_colour or job.judge_shape:
        ok = M.judge_success(after, job.judge_colour, job.judge_shape)
        per["judge_success"] = [float(v) for v in ok]
        per["judge_success_before"] = [float(v) for v in M.judge_success(before, job.judge_colour, job.judge_shape)]
    summary: dict[str, Any] = {name: M.summarize(vals) for name, vals in per.items()}
    if inception is not None:
        summary["fid_kid"] = M.fid_kid(before, after, inception, batch_size=bs)
    rows = [{"key": k, **{name: _clean(vals[i]) for name, vals in per.items()}} for i, k in enumerate(keys)]
    result = {"summary": summary, "n_images": len(keys), "before": _abs(job.before), "after": _abs(job.after),
              "source": job.source, "target": job.target, **used, "match": {k: v for k, v in info.items()
                                                                            if k != "errors"},
              "errors": info["errors"], "config": asdict(job), "per_image": rows}
    if job.out:
        result["out"] = write_eval(result, job.out)
    return result


def _within(url: str, root: str) -> bool:
    a, r = _abs(url).rstrip("/"), _abs(root).rstrip("/")
    return a == r or a.startswith(r + "/")


def check_same_inputs(before: str, after: str) -> None:
    """Refuse (:class:`ConfigError`, exit 1) to pair ``after``'s edits with ``before`` when ``after`` is an
    edit or restyle output whose commit markers record input shards under ``before`` that changed (or
    vanished) since the edits were made from them: the pairs would compare edits with other images.
    Plain image folders and outputs of other inputs pass unchecked."""
    from dclip_ray.stages.verify import changed_inputs

    stale = [c for c in changed_inputs(after) if _within(c["input"], before)]
    if stale:
        c = stale[0]
        raise ConfigError(f"--before {before}: {len(stale)} input shard(s) of --after {after} changed since the edits "
                          f"were made (e.g. {c['input']} {c['problem']}); the pairs would compare edits with other "
                          "images: re-run the edit on the current inputs, or pass the inputs it was made from")


def _abs(url: str) -> str:
    return abs_location(url)


def _clean(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


def _check_out(out: str) -> None:
    check_replaceable("--out", out, "an evaluation", is_eval)
    if out.endswith(".parquet"):
        check_replaceable("--out (its summary)", str(Path(out).with_suffix(".json")), "an evaluation", is_eval)


def is_eval(path: str) -> bool:
    """Whether the file at ``path`` is an evaluation :func:`write_eval` wrote: its JSON (``summary``,
    ``before``, ``after``), or a ``.parquet`` whose ``.json`` beside it names it as its per-image file."""
    p = Path(path)
    if p.suffix == ".parquet":
        side = p.with_suffix(".json")
        return side.is_file() and is_eval(str(side)) and json.loads(side.read_text()).get("per_image_file") == p.name
    data = json.loads(p.read_text())
    return isinstance(data, dict) and isinstance(data.get("summary"), dict) and {"before", "after"} <= data.keys()


def write_eval(result: dict[str, Any], out: str) -> str:
    """Write an evaluation: ``*.parquet`` = per-image rows (+ the rest as ``<stem>.json`` beside it),
    anything else = one JSON file. Returns the path written."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        rows = result["per_image"]
        table = pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})
        pq.write_table(table, path)
        side = {k: v for k, v in result.items() if k != "per_image"}
        path.with_suffix(".json").write_text(json.dumps({**side, "per_image_file": path.name}, indent=2,
                                                        default=str, allow_nan=True))
    else:
        path.write_text(json.dumps(result, indent=2, default=str))
    return str(path)
