"""HTML building blocks of the report (:mod:`.report`): the page's CSS, tables, ``<pre>`` blocks, the
"not available" note and :func:`section`, which turns a failing part into that note instead of
stopping the report.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("dclip_ray.evaluation.report")  # the report's logger, whichever module logs

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;padding:0 24px;color:#222;max-width:1600px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#777;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;font-size:12px;overflow:auto;max-height:320px;
white-space:pre-wrap;overflow-wrap:anywhere}
.warn{background:#fff3cd;border:1px solid #d9a400;padding:8px 12px;margin:10px 0}
img{image-rendering:pixelated;border:1px solid #ccc;margin:4px 0;max-width:100%;height:auto} .na{color:#a55;font-style:italic}
"""
"""The report's inline style sheet (the page loads nothing)."""


def rel(path: Path, root: Path) -> str:
    """``path`` relative to the run folder ``root`` (``"."`` for the folder itself)."""
    rel_path = os.path.relpath(path, root)
    return "." if rel_path == "." else rel_path


def na(reason: str) -> str:
    """The "not available: REASON" paragraph shown in place of a missing or unreadable part."""
    return f'<p class="na">not available: {html.escape(reason)}</p>'


def section(title: str, body_fn: Callable[[], str]) -> str:
    """An ``<h2>`` section with the HTML ``body_fn()`` returns; an exception in ``body_fn`` is logged and
    shown as a "not available" note (a broken part never stops the report)."""
    try:
        body = body_fn()
    except Exception as e:  # noqa: BLE001  (a broken part never stops the report)
        log.warning("report section %s failed: %s", title, e)
        body = na(f"{type(e).__name__}: {e}")
    return f"<h2>{html.escape(title)}</h2>\n{body}"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else ("" if math.isnan(v) else f"{v:.4g}")
    return html.escape("" if v is None else str(v))


def table(rows: list[list[Any]], header: list[str]) -> str:
    """An HTML table: floats to 4 significant digits (NaN blank, ``inf``), None blank, the rest escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pre(obj: Any) -> str:
    """A ``<pre>`` block of ``obj`` (text as is, anything else as indented JSON), cut at 20000 characters."""
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=str)
    return f"<pre>{html.escape(text[:20000])}</pre>"
