"""Where finetune-many keeps each prompt's models, without Ray: a run's model folder and card
(:func:`save_model`, :func:`existing`), and the judging of a prompt whose restarts have all ended
(:func:`finish`: the best that passes the check goes to ``OUT/NAME``, else to ``OUT/NAME.failed``)."""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Any

import fsspec

from dclip_ray.config import QualityCheck
from dclip_ray.errors import InputFileError
from dclip_ray.finetune import FinetuneConfig, copy_model, remove_model, save_finetuned
from dclip_ray.models.card import read_card
from dclip_ray.quality import assess, choose, failed_path, judge, status_of
from dclip_ray.search import KNOBS
from dclip_ray.urls import is_remote, local_path

RESTARTS_SUFFIX = ".restarts"
"""A prompt's restarts train into ``OUT/NAME.restarts/I-seed-S``; the kept one moves to ``OUT/NAME`` (or
``OUT/NAME.failed``) and the folder is removed."""


def save_model(result: Any, out_dir: str, fcfg: FinetuneConfig, base: Any, metrics: dict[str, Any],
               extra: dict[str, Any]) -> None:
    """Write a fine-tuning ``result`` (:func:`dclip_ray.finetune.save_finetuned`) to ``out_dir``, local or an
    fsspec URL (written locally first, then uploaded with the card, the completion mark, last)."""
    if not is_remote(out_dir):
        save_finetuned(result, local_path(out_dir), fcfg, base.unet, base.schedule_config, metrics, extra)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_finetuned(result, tmp, fcfg, base.unet, base.schedule_config, metrics, extra)
        fs, path = fsspec.core.url_to_fs(out_dir)
        names = sorted(os.listdir(tmp), key=lambda n: n == "dclip.json")  # the card (completion mark) last
        for n in names:
            fs.put_file(os.path.join(tmp, n), posixpath.join(path, n))


def existing(out_dir: str, config_hash: str) -> dict[str, Any] | None:
    """The card of a model already trained into ``out_dir`` with this config (None: train it; a damaged
    card is trained anew)."""
    try:
        card = read_card(out_dir)
    except InputFileError:
        return None
    return card.data if card.data.get("config_sha256") == config_hash else None


def storage_path(out: str) -> str:
    """Where Ray Train keeps the runs' checkpoints: ``OUT/_ray_train`` (absolute, or the URL's)."""
    if is_remote(out):
        return f"{out.rstrip('/')}/_ray_train"
    return os.path.abspath(os.path.join(local_path(out), "_ray_train"))


def _measured(card: dict[str, Any] | None) -> dict[str, Any] | None:
    return ((card or {}).get("quality") or {}).get("measured")


def _restart_rows(trained: list[tuple[dict[str, Any], dict[str, Any]]], verdicts: list[Any],
                  restarts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The card's record of every restart: its knobs, seed, scores and verdict (a crashed one with its error)."""
    rows = [{**{k: r[k] for k in (*KNOBS, "seed")}, **{k: (_measured(c) or {}).get(k) for k in
                                   ("score", "direction", "structure", "background", "spread")},
             "final_loss": c.get("final_loss"), "passed": v.passed, "reason": v.reason}
            for (r, c), v in zip(trained, verdicts, strict=True)]
    return rows + [{**{k: r[k] for k in (*KNOBS, "seed")}, "passed": False, "reason": f"training failed: {r['error']}"}
                   for r in restarts if r.get("error")]  # a crashed run is one candidate fewer, on record


def finish(row: dict[str, Any], check: QualityCheck, preset: Any) -> None:
    """Judge a prompt whose restarts have all ended (:mod:`dclip_ray.quality`): keep the best that passes
    the check (else the best: ``failed (quality)`` unless ``--accept-low-quality``), move it to
    ``OUT/NAME`` (``OUT/NAME.failed`` when it fails), its card listing every restart, and remove the
    restarts. A prompt whose model already failed with this config (``OUT/NAME.failed``) is judged again
    from its card (a changed bar or ``--accept-low-quality`` needs no re-training). Updates ``row``."""
    out_dir, h = row["model_path"], row["config_sha256"]
    trained = [(r, c) for r in row["restarts"] if (c := existing(r["path"], r["config_sha256"])) is not None]
    failed_card = existing(failed_path(out_dir), h)
    kept = None
    if trained:
        verdicts = [judge(_measured(c), check.bar(preset), check.min_spread) for _, c in trained]
        best = choose(verdicts)
        kept, src, card = row["restarts"].index(trained[best][0]), trained[best][0]["path"], dict(trained[best][1])
        rows = _restart_rows(trained, verdicts, row["restarts"])
    elif failed_card is not None:  # judged before: judge its stored measurement again
        src, card, rows = failed_path(out_dir), dict(failed_card), failed_card.get("restarts") or []
        kept = failed_card.get("kept_restart")
    else:
        errors = "; ".join(r["error"] for r in row["restarts"] if r.get("error"))
        row.update(status="failed", error=errors or "no restart produced a model")
        return
    quality = assess(_measured(card), check, preset)
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
