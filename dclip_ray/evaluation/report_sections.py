"""The HTML of each part of the report (:mod:`.report`), from what :mod:`.report_discovery` found.

- before/after: :func:`restyle_html` (restyled shards and their manifests), :func:`local_html`
  (single-machine output folders), :func:`others_html` (the input folders, named only);
- :func:`metrics_html`: evaluations and the metrics recorded in model cards;
- :func:`models_html`: fine-tuned models, their loss curves and configuration;
- :func:`config_html`: workflow specs, run ledgers and summaries at the top of the run folder.

Each returns an HTML fragment; a part with nothing to show says "not available" and why.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .report_discovery import decode, images_of, read_json
from .report_draw import image_grid, img_tag, plot_curves
from .report_html import na, pre, rel, table

MAX_IMAGES = 12


def _blank() -> Image.Image:
    return Image.new("RGB", (8, 8), "white")


# ---- fine-tuned models -----------------------------------------------------------------------------


def folder_label(d: Path, root: Path) -> str:
    """A folder's name in the report: relative to the run folder, or the folder's own name for the run
    folder itself (never ".")."""
    where = rel(d, root)
    return where if where != "." else d.resolve().name


def model_label(d: Path, root: Path, card: dict[str, Any]) -> str:
    """A model's name in the report: its folder relative to the run folder, or, for the run folder
    itself (a report of one fine-tuned model), the prompt name or the folder's own name (never ".")."""
    where = rel(d, root)
    return where if where != "." else str(card.get("prompt_name") or d.resolve().name)


def check_label(card: dict[str, Any]) -> str:
    """The model's check (:mod:`dclip_ray.quality`) in a few words: "passed, score 0.82", "FAILED: reason",
    "accepted below the bar, score 0.47", or "not checked"."""
    q = card.get("quality") or {}
    measured = q.get("measured") or {}
    if not q:
        return "not checked"
    score = measured.get("score")
    scored = f"score {score:.3g}" if isinstance(score, (int, float)) else "no score"
    if q.get("passed"):
        return f"passed, {scored}"
    if q.get("accepted_low_quality"):
        return f"accepted below the bar, {scored}"
    return f"FAILED: {q.get('reason') or scored}"


def _loss_curve_html(root: Path, d: Path, c: dict[str, Any]) -> str:
    hist = c.get("loss_history") or {}
    if not hist.get("total"):
        return na("loss curve: the model card has no loss_history (saved by an older dclip-ray)")
    series = {"total": hist["total"]}
    for k, values in hist.items():  # every loss part the card recorded (clip, l1, edge, id, global, ...)
        if k in ("total", "step", "epoch", "lr") or not isinstance(values, list):
            continue
        if any(v for v in values if v is not None and math.isfinite(v)):
            series[k] = values
    return img_tag(plot_curves(series, hist.get("step"), f"fine-tuning loss per step "
                                                         f"({len(hist['total'])} points)"),
                   f"loss curve of {model_label(d, root, c)}")


def models_html(root: Path, cards: list[tuple[Path, dict[str, Any]]]) -> str:
    """The "Fine-tuning" part: a table of the models' prompt pairs, configuration and final metrics, then
    per model its loss curve and its card (``dclip.json``, loss history left out)."""
    if not cards:
        return na("no fine-tuned model (dclip.json) under this folder")
    rows = []
    for d, c in cards:
        m = c.get("metrics") or {}
        rows.append([model_label(d, root, c), c.get("source"), c.get("target"), (c.get("config") or {}).get("t0"),
                     (c.get("config") or {}).get("epochs"), c.get("final_loss"), check_label(c),
                     m.get("quality_s_dir"), c.get("train_seconds")])
    head = ["model", "source", "target", "t0", "epochs", "final loss", "check (held-aside edits)",
            "S_dir (training images)", "seconds"]
    if all(r[7] is None for r in rows):  # only finetune-many measures it: no empty column
        rows, head = [r[:7] + r[8:] for r in rows], head[:7] + head[8:]
    parts = [table(rows, head)]
    for d, c in cards:
        parts.append(f"<h3>{html.escape(model_label(d, root, c))}: {html.escape(str(c.get('source')))} &rarr; "
                     f"{html.escape(str(c.get('target')))}</h3>")
        if "_error" in c:
            parts.append(na(c["_error"]))
            continue
        parts.append(_loss_curve_html(root, d, c))
        parts.append("<details><summary>configuration (dclip.json)</summary>"
                     + pre({k: v for k, v in c.items() if k not in ("loss_history", "train_keys")}) + "</details>")
    return "\n".join(parts)


# ---- before / after --------------------------------------------------------------------------------


def restyle_html(root: Path, variants: list[tuple[Path, list[dict[str, Any]]]]) -> str:
    """Per restyled output folder: shard and image counts, a before/after grid of the first committed
    shard (the "before" read from the input shard named in its marker), the distribution of the edits'
    scores with the lowest-scored edits beside their inputs, and the manifest summary."""
    parts = []
    for d, markers in variants:
        n_ok = sum(int(m.get("n_ok", 0)) for m in markers)
        n_err = sum(int(m.get("n_error", 0)) for m in markers)
        n_skip = sum(int(m.get("n_skipped", 0)) for m in markers)
        n_rej = sum(int(m.get("n_rejected", 0)) for m in markers)
        routed = f", {n_skip} routed to other models (skipped)" if n_skip else ""
        rejected = f", {n_rej} rejected (scored under --min-score)" if n_rej else ""
        parts.append(f"<h3>{html.escape(folder_label(d, root))}</h3><p>{len(markers)} committed shard(s), {n_ok} images ok, "
                     f"{n_err} errors{routed}{rejected}</p>")
        parts.append(scores_html(d, markers))
        first = next((m for m in markers if m.get("n_ok")), markers[0])  # a shard routed away whole has no image
        after = images_of(str(d / f"{first['shard']}.tar"), None, MAX_IMAGES)
        source = first.get("source")
        before = images_of(str(source), list(after), MAX_IMAGES) if source and os.path.exists(str(source)) else {}
        if not after:
            parts.append(na(f"no readable image in {first['shard']}.tar"))
            continue
        keys = list(after)[:MAX_IMAGES]
        rows = []
        if before:
            rows.append(("before", [before.get(k, _blank()) for k in keys]))
        rows.append(("after", [after[k] for k in keys]))
        parts.append(img_tag(image_grid(rows), f"before/after {d.name}"))
        if not before:
            parts.append(na(f"before images: input shard {source} is not readable from here"))
        parts.append(_manifest_html(d))
    return "\n".join(parts)


def scores_html(d: Path, markers: list[dict[str, Any]]) -> str:
    """The score distribution of an output folder's edits (from its markers) and its lowest-scored edits
    beside their inputs (read from the output or the rejected tar, and the input shard)."""
    from dclip_ray.io.shards import shard_urls
    from dclip_ray.scoring import ScoreStats, merged

    stats = merged(ScoreStats.from_dict(m.get("scores")) for m in markers)
    if stats.n == 0:
        return na("edit scores: these edits were not scored (no CLIP known, or the models name no source and target)")
    sources = {m.get("shard"): m.get("source") for m in markers}

    def pair(shard: str, key: str) -> tuple[Image.Image | None, Image.Image | None]:
        urls = shard_urls(str(d), shard)
        after = images_of(urls["tar"], [key], 1) or images_of(urls["rejected"], [key], 1)
        src = sources.get(shard)
        before = images_of(str(src), [key], 1) if src and os.path.exists(str(src)) else {}
        return before.get(key), after.get(key)

    return _scores_strip(d, stats, pair)


def _scores_strip(d: Path, stats: Any, pair: Any) -> str:
    """The distribution table of ``stats`` (a :class:`~dclip_ray.scoring.ScoreStats`) and its lowest-scored
    edits beside their inputs; ``pair(shard, key) -> (input or None, edit or None)``."""
    s = stats.summary()
    out = table([[s["n"], s["mean"], s["min"], s["p10"], s["p50"], s["p90"], s["max"], s["n_rejected"]]],
                ["edits scored", "mean", "min", "p10", "median", "p90", "max", "rejected"])
    before_row, after_row, labels = [], [], []
    for score, shard, key in stats.lowest:
        before, after = pair(shard, key)
        before_row.append(before or _blank())
        after_row.append(after or _blank())
        labels.append([key, shard, score])
    out += "<p>The lowest-scored edits (input above, edit below; left to right as in the table):</p>"
    out += img_tag(image_grid([("input", before_row), ("edit", after_row)]), f"lowest-scored edits {d.name}")
    out += table(labels, ["key", "shard", "score"])
    return out


def local_scores_html(d: Path, summary: dict[str, Any] | None) -> str:
    """A translate / from-strokes output's scores (its ``scores.parquet``): the distribution and the
    lowest-scored edits (from ``d`` or ``d/rejected``) beside their inputs (the command's ``--images``
    when readable from here); "" when the folder has no scores."""
    from dclip_ray.applications import REJECTED_DIR, SCORES_FILE
    from dclip_ray.io.manifest import read_manifest
    from dclip_ray.scoring import stats_of_rows

    if not (d / SCORES_FILE).is_file():
        return ""
    try:
        rows = read_manifest(str(d / SCORES_FILE))
    except Exception:  # noqa: BLE001  (a report shows what it can)
        return na(f"edit scores: {SCORES_FILE} cannot be read")
    stats = stats_of_rows(rows)
    if stats.n == 0:
        return na("edit scores: no edit was scored")
    src = ((summary or {}).get("config") or {}).get("images")

    def pair(shard: str, key: str) -> tuple[Image.Image | None, Image.Image | None]:
        files = [d / f"{key}.png", d / REJECTED_DIR / f"{key}.png"]
        after = next((decode(f.read_bytes()) for f in files if f.is_file()), None)
        before = images_of(str(src), [key], 1).get(key) if src else None
        return before, after

    return "<h4>edit scores</h4>" + _scores_strip(d, stats, pair)


def _manifest_html(d: Path) -> str:
    from dclip_ray.io.manifest import read_manifest

    errors, metrics = [], {}
    for p in sorted(d.glob("*.parquet")):
        try:
            rows = read_manifest(str(p))
        except Exception:  # noqa: BLE001
            continue
        for r in rows:
            if r.status == "error":
                errors.append([r.shard, r.key, r.error])
            for k, v in (r.metrics or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics.setdefault(k, []).append(float(v))
    out = ""
    if metrics:
        out += table([[k, float(np.mean(v)), float(np.min(v)), float(np.max(v)), len(v)] for k, v in metrics.items()],
                     ["manifest metric", "mean", "min", "max", "n"])
    if errors:
        out += "<details><summary>" + f"{len(errors)} error rows" + "</summary>" + table(
            errors[:200], ["shard", "key", "error"]) + "</details>"
    return out


def _local_rows(d: Path, summary: dict[str, Any] | None, after: dict[str, Image.Image],
                keys: list[str]) -> list[tuple[str, list[Image.Image]]]:
    rows = []
    src = ((summary or {}).get("config") or {}).get("images")
    if src:
        before = images_of(str(src), keys, MAX_IMAGES)
        if before:
            rows.append(("input", [before.get(k, _blank()) for k in keys]))
    if (d / "domain").is_dir():
        dom = {k: decode((d / "domain" / f"{k}.png").read_bytes()) for k in keys if (d / "domain" / f"{k}.png").exists()}
        if dom:
            rows.append(("trained dom.", [dom.get(k) or _blank() for k in keys]))
    if keys:
        rows.append(("output", [after[k] for k in keys]))
    return rows


def local_html(root: Path, outputs: list[tuple[Path, dict[str, Any] | None]]) -> str:
    """Per single-machine output folder (with its ``dclip_run.json`` summary or None): a grid of input,
    trained-domain and output rows, else the command's own ``grid.png``, else the outputs alone."""
    parts = []
    for d, summary in outputs:
        title = (summary or {}).get("kind", "images")
        parts.append(f"<h3>{html.escape(folder_label(d, root))} ({html.escape(str(title))})</h3>")
        after = {p.stem: img for p in sorted(d.glob("*.png"))[: MAX_IMAGES + 1]
                 if p.name != "grid.png" and (img := decode(p.read_bytes())) is not None}
        rows = _local_rows(d, summary, after, list(after)[:MAX_IMAGES])
        if len(rows) > 1:
            parts.append(img_tag(image_grid(rows), f"grid {d.name}"))
        elif (d / "grid.png").is_file() and (g := decode((d / "grid.png").read_bytes())) is not None:
            parts.append("<p class='muted'>grid.png written by the command (rows: before, after)</p>")
            parts.append(img_tag(g, f"grid.png of {d.name}"))
        elif rows:
            parts.append(img_tag(image_grid(rows), f"outputs {d.name}"))
            parts.append(na("before images: the folder does not say where its inputs are (evaluate it with "
                            "`dclip-ray eval --out FOLDER/eval.json` to link them)"))
        else:
            parts.append(na("no readable image"))
        parts.append(local_scores_html(d, summary))
        if summary:
            parts.append("<details><summary>summary</summary>" + pre(summary) + "</details>")
    return "\n".join(parts)


def others_html(root: Path, others: list[Path]) -> str:
    """One line naming (up to 20 of) the other image folders, which are inputs and not shown; "" if none."""
    if not others:
        return ""
    names = ", ".join(html.escape(rel(d, root)) for d in others[:20])
    return f"<p class='muted'>other image folders (inputs, not shown): {names}</p>"


# ---- metrics and configuration ---------------------------------------------------------------------


def _eval_rows(e: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, s in e["summary"].items():
        if name == "fid_kid" and isinstance(s, dict):
            rows.extend([[k, v, None, None, None, e.get("n_images")] for k, v in s.items()])
        elif isinstance(s, dict):
            rows.append([name, s.get("mean"), s.get("std"), s.get("min"), s.get("max"),
                         f"{s.get('n')}" + (f" (+{s['n_inf']} inf)" if s.get("n_inf") else "")])
    return rows


def metrics_html(root: Path, evals: list[tuple[Path, dict[str, Any]]], cards: list[tuple[Path, dict[str, Any]]],
                 ) -> str:
    """The "Metrics" part: one table per evaluation file (mean/std/min/max/n of each metric) and the
    numeric metrics recorded in the model cards."""
    parts = []
    for p, e in evals:
        desc = f"{e.get('source')} &rarr; {e.get('target')}" if e.get("target") else ""
        parts.append(f"<h3>{html.escape(rel(p, root))} <span class='muted'>{e.get('n_images')} pairs "
                     f"{desc} {html.escape(str(e.get('clip') or ''))}</span></h3>")
        parts.append(table(_eval_rows(e), ["metric", "mean", "std", "min", "max", "n"]))
    card_rows = [[rel(d, root), k, v] for d, c in cards for k, v in (c.get("metrics") or {}).items()
                 if isinstance(v, (int, float))]
    if card_rows:
        parts.append("<h3>metrics recorded in model cards</h3>" + table(card_rows, ["model", "metric", "value"]))
    return "\n".join(parts) or na("no evaluation found (run `dclip-ray eval ... --out RUN_DIR/eval.json`)")


def config_html(root: Path, dirs: list[Path], config: Mapping[str, Any] | None = None) -> str:
    """The "Configuration" part: ``config`` (``{title: text or JSON-able data}``) first, then the
    workflow specs (``*.yaml``), prompts, ledgers (``*.jsonl``, last 5 entries) and JSON summaries at the
    top of ``root``."""
    parts = [f"<h3>{html.escape(str(name))}</h3>" + pre(value) for name, value in (config or {}).items()]
    top = [p for p in sorted(root.iterdir()) if p.is_file()] if root.is_dir() else []
    for p in top:
        if p.suffix in (".yaml", ".yml") or p.name in ("prompts.txt",):
            parts.append(f"<h3>{html.escape(p.name)}</h3>" + pre(p.read_text(errors="replace")))
        elif p.name.endswith(".jsonl"):
            lines = p.read_text(errors="replace").splitlines()
            parts.append(f"<h3>{html.escape(p.name)} (last {min(5, len(lines))} of {len(lines)} entries)</h3>"
                         + pre("\n".join(lines[-5:])))
        elif p.suffix == ".json" and not p.name.startswith("eval"):
            try:
                parts.append(f"<h3>{html.escape(p.name)}</h3>" + pre(read_json(p)))
            except ValueError:
                parts.append(f"<h3>{html.escape(p.name)}</h3>" + na("not valid JSON"))
    return "\n".join(parts) or na("no configuration file (workflow spec, prompts, summaries) at the top of the run")
