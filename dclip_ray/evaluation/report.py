"""One self-contained HTML report of a run (`dclip-ray report RUN_DIR`): opens offline, mails as one file.

Images are inlined as base64 PNG; nothing refers to a URL. The report finds, anywhere under the run
folder (4 levels deep; Ray Train's ``_ray_train`` and hidden folders skipped):

- fine-tuned models (a ``dclip.json`` card): prompt pair, training configuration, final metrics and the
  loss curve drawn from the card's ``loss_history`` (PIL, no plotting library needed);
- restyled outputs (``{shard}_stats.json`` commit markers of `dclip-ray restyle`): before/after grid
  (the "before" images are read from the input shard named in the marker), manifest counts;
- single-machine outputs: ``dclip_run.json`` of `translate` / `from-strokes` (input / trained domain /
  edited rows), or folders of ``{key}.png`` with a ``grid.png`` (`dclip-ray edit --grid`);
- evaluations (``eval*.json`` from `dclip-ray eval`): the metrics table;
- configuration: workflow specs (``*.yaml``), run ledgers (``runs.jsonl``) and summaries.

It also draws the before/after PNG grids the single-machine commands write (:func:`save_grid`).

A part that is missing or unreadable shows "not available" with the reason; the report is still written.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dclip_ray import __version__
from dclip_ray.errors import InputFileError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_DEPTH = 4
MAX_IMAGES = 12
CELL = 80  # pixels per image cell in grids
SKIP_DIRS = {"_ray_train", "__pycache__", "domain"}
MARKER_FORMAT = "dclip-ray/restyle-shard/1"
RUN_FILE = "dclip_run.json"
"""The summary a single-machine application (`translate`, `from-strokes`) writes into its output folder."""

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#777;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;font-size:12px;overflow:auto;max-height:320px}
img{image-rendering:pixelated;border:1px solid #ccc;margin:4px 0;max-width:100%;height:auto} .na{color:#a55;font-style:italic}
"""


# ---- drawing ---------------------------------------------------------------------------------------


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(img: Image.Image, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png_b64(img)}" width="{img.width}">'


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def image_grid(rows: list[tuple[str, list[Image.Image]]], cell: int = CELL) -> Image.Image:
    """Rows of images (each row ``(label, [PIL images])``) as one labelled grid image; small images are
    enlarged with nearest-neighbour so 32x32 pixels stay visible."""
    label_w = 90
    ncols = max((len(r[1]) for r in rows), default=1) or 1
    pad = 4
    grid = Image.new("RGB", (label_w + ncols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, images) in enumerate(rows):
        y = pad + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label[:14], fill=(40, 40, 40), font=_font())
        for j, im in enumerate(images):
            im = im.convert("RGB")
            resample = Image.NEAREST if max(im.size) <= cell else Image.BICUBIC
            grid.paste(im.resize((cell, cell), resample), (label_w + pad + j * (cell + pad), y))
    return grid


def plot_curves(series: dict[str, list[float]], steps: list[float] | None = None, title: str = "",
                size: tuple[int, int] = (640, 300)) -> Image.Image:
    """A line chart of ``series`` (name -> values over ``steps``) drawn with PIL: axes, ticks, legend, and a
    moving average of the first series when it is noisy."""
    w, h = size
    left, right, top, bottom = 60, 130, 28, 36
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    d.text((left, 8), title, fill=(0, 0, 0), font=font)
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not values:
        d.text((left, h // 2), "no finite values", fill=(150, 50, 50), font=font)
        return img
    n = max(len(s) for s in series.values())
    xs = steps if steps is not None and len(steps) == n else list(range(n))
    x_lo, x_hi = float(min(xs)), float(max(xs)) if len(xs) > 1 else float(min(xs)) + 1
    y_lo, y_hi = min(values), max(values)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pw, ph = w - left - right, h - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x_lo) / (x_hi - x_lo or 1) * pw, top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph

    d.rectangle([left, top, left + pw, top + ph], outline=(120, 120, 120))
    for k in range(5):
        yv = y_lo + (y_hi - y_lo) * k / 4
        _, yp = px(x_lo, yv)
        d.line([left - 4, yp, left, yp], fill=(120, 120, 120))
        d.line([left + 1, yp, left + pw - 1, yp], fill=(235, 235, 235))
        d.text((4, yp - 6), f"{yv:.3g}", fill=(60, 60, 60), font=font)
        xv = x_lo + (x_hi - x_lo) * k / 4
        xp, _ = px(xv, y_lo)
        d.line([xp, top + ph, xp, top + ph + 4], fill=(120, 120, 120))
        d.text((xp - 10, top + ph + 8), f"{xv:.4g}", fill=(60, 60, 60), font=font)
    d.text((left + pw // 2 - 10, h - 14), "step", fill=(60, 60, 60), font=font)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    legend = []
    for idx, (name, vals) in enumerate(series.items()):
        colour = palette[idx % len(palette)]
        pts = [px(x, v) for x, v in zip(xs, vals, strict=False) if v is not None and math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=1 if len(pts) > 200 else 2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        legend.append((name, colour))
        if idx == 0 and len(vals) >= 20:  # a moving average makes the trend of a noisy per-step loss readable
            win = max(5, len(vals) // 20)
            arr = np.asarray([v if v is not None and math.isfinite(v) else np.nan for v in vals], dtype=float)
            kernel = np.ones(win) / win
            smooth = np.convolve(np.nan_to_num(arr, nan=float(np.nanmean(arr))), kernel, mode="valid")
            sx = xs[win - 1:]
            d.line([px(x, v) for x, v in zip(sx, smooth, strict=False)], fill=(0, 0, 0), width=2)
            legend.append((f"{name} (avg {win})", (0, 0, 0)))
    for i, (name, colour) in enumerate(legend):
        y = top + 4 + i * 16
        d.line([left + pw + 10, y + 6, left + pw + 28, y + 6], fill=colour, width=3)
        d.text((left + pw + 32, y), name[:16], fill=(30, 30, 30), font=font)
    return img


# ---- discovery -------------------------------------------------------------------------------------


def _walk(root: Path) -> list[Path]:
    out = []
    base_depth = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root):
        depth = len(Path(dirpath).parts) - base_depth
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        if depth >= MAX_DEPTH:
            dirnames[:] = []
        out.append(Path(dirpath))
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _rel(path: Path, root: Path) -> str:
    rel = os.path.relpath(path, root)
    return "." if rel == "." else rel


def _na(reason: str) -> str:
    return f'<p class="na">not available: {html.escape(reason)}</p>'


def _section(title: str, body_fn: Callable[[], str]) -> str:
    try:
        body = body_fn()
    except Exception as e:  # noqa: BLE001  (a broken part never stops the report)
        log.warning("report section %s failed: %s", title, e)
        body = _na(f"{type(e).__name__}: {e}")
    return f"<h2>{html.escape(title)}</h2>\n{body}"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "inf" if math.isinf(v) else ("" if math.isnan(v) else f"{v:.4g}")
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pre(obj: Any) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=str)
    return f"<pre>{html.escape(text[:20000])}</pre>"


def _decode(data: bytes) -> Image.Image | None:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception:  # noqa: BLE001
        return None


def _images_of(url: str, keys: list[str] | None, limit: int) -> dict[str, Image.Image]:
    from dclip_ray.io.sources import iter_records

    want = set(keys) if keys is not None else None
    out: dict[str, Image.Image] = {}
    try:
        for rec in iter_records(url):
            if want is not None and rec.key not in want:
                continue
            if rec.image is not None and (img := _decode(rec.image)) is not None:
                out[rec.key] = img
            if len(out) >= (len(want) if want is not None else limit):
                break
    except (InputFileError, OSError) as e:
        log.warning("report: cannot read %s: %s", url, e)
    return out


# ---- sections --------------------------------------------------------------------------------------


def _model_cards(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    cards = []
    for d in dirs:
        p = d / "dclip.json"
        if p.is_file():
            try:
                cards.append((d, _read_json(p)))
            except ValueError as e:
                cards.append((d, {"_error": f"dclip.json is not valid JSON ({e})"}))
    return cards


def _models_html(root: Path, cards: list[tuple[Path, dict[str, Any]]]) -> str:
    if not cards:
        return _na("no fine-tuned model (dclip.json) under this folder")
    rows = []
    for d, c in cards:
        m = c.get("metrics") or {}
        rows.append([_rel(d, root), c.get("source"), c.get("target"), (c.get("config") or {}).get("t0"),
                     (c.get("config") or {}).get("epochs"), c.get("final_loss"), m.get("quality_s_dir"),
                     c.get("train_seconds")])
    parts = [_table(rows, ["model", "source", "target", "t0", "epochs", "final loss", "S_dir (train)", "seconds"])]
    for d, c in cards:
        parts.append(f"<h3>{html.escape(_rel(d, root))}: {html.escape(str(c.get('source')))} &rarr; "
                     f"{html.escape(str(c.get('target')))}</h3>")
        if "_error" in c:
            parts.append(_na(c["_error"]))
            continue
        hist = c.get("loss_history") or {}
        if hist.get("total"):
            series = {"total": hist["total"]}
            for k in ("clip", "direction", "l1", "id", "global"):
                if k in hist and any(v for v in hist[k] if v is not None and math.isfinite(v)):
                    series[k] = hist[k]
            parts.append(_img_tag(plot_curves(series, hist.get("step"), f"fine-tuning loss per step "
                                                                          f"({len(hist['total'])} points)"),
                                  f"loss curve of {_rel(d, root)}"))
        else:
            parts.append(_na("loss curve: the model card has no loss_history (saved by an older dclip-ray)"))
        parts.append("<details><summary>configuration (dclip.json)</summary>"
                     + _pre({k: v for k, v in c.items() if k not in ("loss_history", "train_keys")}) + "</details>")
    return "\n".join(parts)


def _restyle_variants(dirs: list[Path]) -> list[tuple[Path, list[dict[str, Any]]]]:
    out = []
    for d in dirs:
        markers = []
        for p in sorted(d.glob("*_stats.json")):
            try:
                m = _read_json(p)
            except ValueError:
                continue
            if isinstance(m, dict) and m.get("format") == MARKER_FORMAT:
                markers.append(m)
        if markers:
            out.append((d, markers))
    return out


def _restyle_html(root: Path, variants: list[tuple[Path, list[dict[str, Any]]]]) -> str:
    parts = []
    for d, markers in variants:
        n_ok = sum(int(m.get("n_ok", 0)) for m in markers)
        n_err = sum(int(m.get("n_error", 0)) for m in markers)
        parts.append(f"<h3>{html.escape(_rel(d, root))}</h3><p>{len(markers)} committed shard(s), {n_ok} images ok, "
                     f"{n_err} errors</p>")
        first = markers[0]
        after = _images_of(str(d / f"{first['shard']}.tar"), None, MAX_IMAGES)
        source = first.get("source")
        before = _images_of(str(source), list(after), MAX_IMAGES) if source and os.path.exists(str(source)) else {}
        if not after:
            parts.append(_na(f"no readable image in {first['shard']}.tar"))
            continue
        keys = list(after)[:MAX_IMAGES]
        rows = []
        if before:
            rows.append(("before", [before.get(k, Image.new("RGB", (8, 8), "white")) for k in keys]))
        rows.append(("after", [after[k] for k in keys]))
        parts.append(_img_tag(image_grid(rows), f"before/after {d.name}"))
        if not before:
            parts.append(_na(f"before images: input shard {source} is not readable from here"))
        parts.append(_manifest_html(d))
    return "\n".join(parts)


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
        out += _table([[k, float(np.mean(v)), float(np.min(v)), float(np.max(v)), len(v)] for k, v in metrics.items()],
                      ["manifest metric", "mean", "min", "max", "n"])
    if errors:
        out += "<details><summary>" + f"{len(errors)} error rows" + "</summary>" + _table(
            errors[:200], ["shard", "key", "error"]) + "</details>"
    return out


def _local_outputs(dirs: list[Path], evals: list[tuple[Path, dict[str, Any]]],
                   ) -> tuple[list[tuple[Path, dict[str, Any] | None]], list[Path]]:
    """Output folders of single-machine commands, and the other image folders (inputs, not shown).

    An output folder has a ``dclip_run.json``, a ``grid.png`` (`edit --grid`) or is the ``after`` of an
    evaluation; a folder that is some run's input (``images`` / ``before``) is not an output.
    """
    def resolved(p: Any) -> str | None:
        return str(Path(str(p)).resolve()) if p and "://" not in str(p) else None

    runs: dict[Path, dict[str, Any] | None] = {}
    for d in dirs:
        if (d / RUN_FILE).is_file():
            try:
                runs[d] = _read_json(d / RUN_FILE)
            except ValueError:
                runs[d] = None
    inputs = {resolved(((s or {}).get("config") or {}).get("images")) for s in runs.values()}
    inputs |= {resolved(e.get("before")) for _, e in evals}
    afters = {resolved(e.get("after")): e for _, e in evals}
    outputs, others = [], []
    for d in dirs:
        key = str(d.resolve())
        if d in runs:
            outputs.append((d, runs[d]))
        elif key in inputs:
            continue
        elif (d / "grid.png").is_file() or key in afters:
            e = afters.get(key)
            outputs.append((d, {"kind": "edited images", "config": {"images": e.get("before")}} if e else None))
        elif any(d.glob("*.png")) and not (d / "dclip.json").exists() and not any(d.glob("*_stats.json")):
            others.append(d)
    return outputs, others


def _local_html(root: Path, outputs: list[tuple[Path, dict[str, Any] | None]]) -> str:
    parts = []
    for d, summary in outputs:
        title = (summary or {}).get("kind", "images")
        parts.append(f"<h3>{html.escape(_rel(d, root))} ({html.escape(str(title))})</h3>")
        after = {p.stem: img for p in sorted(d.glob("*.png"))[: MAX_IMAGES + 1]
                 if p.name != "grid.png" and (img := _decode(p.read_bytes())) is not None}
        keys = list(after)[:MAX_IMAGES]
        rows = []
        src = ((summary or {}).get("config") or {}).get("images")
        if src:
            before = _images_of(str(src), keys, MAX_IMAGES)
            if before:
                rows.append(("input", [before.get(k, Image.new("RGB", (8, 8), "white")) for k in keys]))
        if (d / "domain").is_dir():
            dom = {k: _decode((d / "domain" / f"{k}.png").read_bytes()) for k in keys if (d / "domain" / f"{k}.png").exists()}
            if dom:
                rows.append(("trained dom.", [dom.get(k) or Image.new("RGB", (8, 8), "white") for k in keys]))
        if keys:
            rows.append(("output", [after[k] for k in keys]))
        if len(rows) > 1:
            parts.append(_img_tag(image_grid(rows), f"grid {d.name}"))
        elif (d / "grid.png").is_file() and (g := _decode((d / "grid.png").read_bytes())) is not None:
            parts.append("<p class='muted'>grid.png written by the command (rows: before, after)</p>")
            parts.append(_img_tag(g, f"grid.png of {d.name}"))
        elif rows:
            parts.append(_img_tag(image_grid(rows), f"outputs {d.name}"))
            parts.append(_na("before images: the folder does not say where its inputs are (evaluate it with "
                             "`dclip-ray eval --out FOLDER/eval.json` to link them)"))
        else:
            parts.append(_na("no readable image"))
        if summary:
            parts.append("<details><summary>summary</summary>" + _pre(summary) + "</details>")
    return "\n".join(parts)


def _others_html(root: Path, others: list[Path]) -> str:
    if not others:
        return ""
    names = ", ".join(html.escape(_rel(d, root)) for d in others[:20])
    return f"<p class='muted'>other image folders (inputs, not shown): {names}</p>"


def _evals(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for d in dirs:
        for p in sorted(d.glob("eval*.json")) + sorted(d.glob("metrics*.json")):
            try:
                e = _read_json(p)
            except ValueError:
                continue
            if isinstance(e, dict) and isinstance(e.get("summary"), dict):
                out.append((p, e))
    return out


def _metrics_html(root: Path, evals: list[tuple[Path, dict[str, Any]]], cards: list[tuple[Path, dict[str, Any]]],
                  ) -> str:
    parts = []
    for p, e in evals:
        rows = []
        for name, s in e["summary"].items():
            if name == "fid_kid" and isinstance(s, dict):
                rows.extend([[k, v, None, None, None, e.get("n_images")] for k, v in s.items()])
            elif isinstance(s, dict):
                rows.append([name, s.get("mean"), s.get("std"), s.get("min"), s.get("max"),
                             f"{s.get('n')}" + (f" (+{s['n_inf']} inf)" if s.get("n_inf") else "")])
        desc = f"{e.get('source')} &rarr; {e.get('target')}" if e.get("target") else ""
        parts.append(f"<h3>{html.escape(_rel(p, root))} <span class='muted'>{e.get('n_images')} pairs "
                     f"{desc} {html.escape(str(e.get('clip') or ''))}</span></h3>")
        parts.append(_table(rows, ["metric", "mean", "std", "min", "max", "n"]))
    card_rows = [[_rel(d, root), k, v] for d, c in cards for k, v in (c.get("metrics") or {}).items()
                 if isinstance(v, (int, float))]
    if card_rows:
        parts.append("<h3>metrics recorded in model cards</h3>" + _table(card_rows, ["model", "metric", "value"]))
    return "\n".join(parts) or _na("no evaluation found (run `dclip-ray eval ... --out RUN_DIR/eval.json`)")


def _config_html(root: Path, dirs: list[Path], config: Mapping[str, Any] | None = None) -> str:
    parts = [f"<h3>{html.escape(str(name))}</h3>" + _pre(value) for name, value in (config or {}).items()]
    top = [p for p in sorted(root.iterdir()) if p.is_file()] if root.is_dir() else []
    for p in top:
        if p.suffix in (".yaml", ".yml") or p.name in ("prompts.txt",):
            parts.append(f"<h3>{html.escape(p.name)}</h3>" + _pre(p.read_text(errors="replace")))
        elif p.name.endswith(".jsonl"):
            lines = p.read_text(errors="replace").splitlines()
            parts.append(f"<h3>{html.escape(p.name)} (last {min(5, len(lines))} of {len(lines)} entries)</h3>"
                         + _pre("\n".join(lines[-5:])))
        elif p.suffix == ".json" and not p.name.startswith("eval"):
            try:
                parts.append(f"<h3>{html.escape(p.name)}</h3>" + _pre(_read_json(p)))
            except ValueError:
                parts.append(f"<h3>{html.escape(p.name)}</h3>" + _na("not valid JSON"))
    return "\n".join(parts) or _na("no configuration file (workflow spec, prompts, summaries) at the top of the run")


def write_report(run_dir: str, out: str | None = None, config: Mapping[str, Any] | None = None) -> str:
    """Write ONE self-contained HTML page describing the run folder ``run_dir``; return its path.

    ``out`` defaults to ``run_dir/report.html``. Works on a `finetune` / `edit` / `translate` output
    folder and on a pipeline run folder (models, restyled shards, evaluations, workflow spec); parts that
    are missing show "not available". ``config``: ``{title: text or JSON-able data}`` shown first under
    "Configuration" (the workflow runner passes the spec as run, which need not live in ``run_dir``).
    Raises :class:`InputFileError` only when ``run_dir`` is not a folder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise InputFileError(f"{run_dir}: not a folder; give the output folder of a dclip-ray command or run")
    dirs = _walk(root)
    cards = _model_cards(dirs)
    variants = _restyle_variants(dirs)
    evals = _evals(dirs)
    locals_, other_dirs = _local_outputs(dirs, evals)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = (f"{len(cards)} fine-tuned model(s), {len(variants)} restyled output(s), {len(locals_)} edit output folder(s), "
              f"{len(evals)} evaluation(s)")
    sections = [
        _section("Before / after", lambda: "\n".join(x for x in (_restyle_html(root, variants),
                                                                   _local_html(root, locals_),
                                                                   _others_html(root, other_dirs)) if x)
                 or _na("no edited images found (restyle shards, edit/translate outputs)")),
        _section("Metrics", lambda: _metrics_html(root, evals, cards)),
        _section("Fine-tuning", lambda: _models_html(root, cards)),
        _section("Configuration", lambda: _config_html(root, dirs, config)),
    ]
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>dclip-ray report: {html.escape(root.resolve().name)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>dclip-ray report: {html.escape(root.resolve().name)}</h1>\n"
            f"<p class='muted'>{html.escape(str(root.resolve()))} &middot; {now} &middot; dclip-ray {__version__}"
            f" &middot; {counts}</p>\n" + "\n".join(sections) + "\n</body></html>\n")
    path = Path(out) if out else root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 4) -> Path:
    """Save image rows as one PNG grid: each row [N,3,H,W] in [-1,1] (e.g. before, reconstruction, after).

    ``scale`` enlarges small images (nearest neighbour) so a 32x32 toy image stays visible.
    """
    import torch  # lazily: the HTML report itself needs no torch
    from torchvision.utils import make_grid, save_image

    if not rows:
        raise ValueError("save_grid needs at least one row")
    n = rows[0].shape[0]
    x = torch.cat([r[:n].detach().float().cpu() for r in rows])
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid((x.clamp(-1, 1) + 1) / 2, nrow=n, padding=2, pad_value=1.0), path)
    return path
