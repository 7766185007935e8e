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

This module assembles the page; the parts live next to it: :mod:`.report_discovery` (what is in the
run folder), :mod:`.report_sections` (the HTML of each part), :mod:`.report_html` (HTML building
blocks and CSS) and :mod:`.report_draw` (grids, charts, :func:`save_grid`). Their public names used
elsewhere are re-exported here, the import path to use.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dclip_ray import __version__
from dclip_ray.errors import DclipWarning, InputFileError
from dclip_ray.io.locations import check_replaceable
from dclip_ray.stages.verify import changed_inputs
from dclip_ray.urls import redact_html

from .report_discovery import (
    MARKER_FORMAT,
    MAX_DEPTH,
    RUN_FILE,
    SKIP_DIRS,
    find_evals,
    find_local_outputs,
    find_model_cards,
    find_restyle_variants,
    find_used_models,
    walk,
)
from .report_draw import CELL, image_grid, plot_curves, save_grid
from .report_html import CSS, na, section
from .report_sections import (
    MAX_IMAGES,
    config_html,
    local_html,
    metrics_html,
    models_html,
    others_html,
    restyle_html,
)

__all__ = [
    "CELL",
    "MARKER_FORMAT",
    "MAX_DEPTH",
    "MAX_IMAGES",
    "RUN_FILE",
    "SKIP_DIRS",
    "image_grid",
    "plot_curves",
    "save_grid",
    "write_report",
]

log = logging.getLogger(__name__)


def _changed_inputs(folders: list[Path]) -> list[dict[str, str]]:
    """The output shards among ``folders`` whose recorded input changed since; each also as one
    ``warning:`` line (a :class:`DclipWarning`), since the page pairs those outputs with other images."""
    known: dict[str, str | None] = {}  # the variants of one restyle share their inputs: hash each once
    stale = [c for d in folders for c in changed_inputs(str(d), known)]
    if stale:
        c = stale[0]
        warnings.warn(DclipWarning(f"report: {len(stale)} output shard(s) were made from inputs that changed since "
                                   f"(e.g. {c['input']} {c['problem']}): the page pairs those edits with other "
                                   "images; re-run the edit on the current inputs"), stacklevel=2)
    return stale


def _stale_html(stale: list[dict[str, str]]) -> str:
    if not stale:
        return ""
    items = "".join(f"<li>{html.escape(c['shard'])}: its input {html.escape(c['input'])} {html.escape(c['problem'])}"
                    "</li>" for c in stale[:20])
    more = f"<li>... and {len(stale) - 20} more</li>" if len(stale) > 20 else ""
    return ("<div class='warn'><b>The inputs changed after these outputs were made.</b> Before/after pairs "
            f"below show edits beside other images than they were made from:<ul>{items}{more}</ul></div>\n")


REPORT_HEAD = "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>dclip-ray report: "
"""How every page :func:`write_report` writes begins (what :func:`is_report` looks for)."""


def is_report(path: str) -> bool:
    """Whether the file at ``path`` is a report :func:`write_report` wrote (its first bytes)."""
    with open(path, "rb") as f:
        return f.read(len(REPORT_HEAD.encode())) == REPORT_HEAD.encode()


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
    check_replaceable("--out" if out else "the report", out or str(root / "report.html"), "an HTML report", is_report)
    dirs = walk(root)
    variants = find_restyle_variants(dirs)
    evals = find_evals(dirs)
    locals_, other_dirs = find_local_outputs(dirs, evals)
    cards = find_model_cards(dirs)
    cards += find_used_models(dirs, cards, locals_)
    stale = _changed_inputs([d for d, _ in locals_] + [d for d, _ in variants])
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = (f"{len(cards)} fine-tuned model(s), {len(variants)} restyled output(s), {len(locals_)} edit output folder(s), "
              f"{len(evals)} evaluation(s)")
    sections = [
        section("Before / after", lambda: "\n".join(x for x in (restyle_html(root, variants),
                                                                  local_html(root, locals_),
                                                                  others_html(root, other_dirs)) if x)
                or na("no edited images found (restyle shards, edit/translate outputs)")),
        section("Metrics", lambda: metrics_html(root, evals, cards)),
        section("Fine-tuning", lambda: models_html(root, cards)),
        section("Configuration", lambda: config_html(root, dirs, config)),
    ]
    page = (f"{REPORT_HEAD}{html.escape(root.resolve().name)}</title><style>{CSS}</style></head><body>\n"
            f"<h1>dclip-ray report: {html.escape(root.resolve().name)}</h1>\n"
            f"<p class='muted'>{html.escape(str(root.resolve()))} &middot; {now} &middot; dclip-ray {__version__}"
            f" &middot; {counts}</p>\n" + _stale_html(stale) + "\n".join(sections) + "\n</body></html>\n")
    page = redact_html(page)  # a URL's credentials (a spec's input.url, a ledger line) never reach the page
    path = Path(out) if out else root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return str(path)
