"""What the report (:mod:`.report`) finds in a run folder, and the image reading it needs.

:func:`walk` lists the folders (:data:`MAX_DEPTH` levels deep, hidden folders and :data:`SKIP_DIRS`
skipped); :func:`find_model_cards`, :func:`find_restyle_variants`, :func:`find_evals` and
:func:`find_local_outputs` pick the fine-tuned models, restyled outputs, evaluations and
single-machine output folders among them; :func:`images_of` and :func:`decode` read images for the
before/after grids.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image

from dclip_ray.errors import InputFileError
from dclip_ray.urls import is_url

log = logging.getLogger("dclip_ray.evaluation.report")  # the report's logger, whichever module logs

MAX_DEPTH = 4
SKIP_DIRS = {"_ray_train", "__pycache__", "domain"}
MARKER_FORMAT = "dclip-ray/restyle-shard/1"
RUN_FILE = "dclip_run.json"
"""The summary a single-machine application (`translate`, `from-strokes`) writes into its output folder."""


def walk(root: Path) -> list[Path]:
    """``root`` and its sub-folders down to :data:`MAX_DEPTH` levels, sorted, hidden and
    :data:`SKIP_DIRS` folders left out."""
    out = []
    base_depth = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root):
        depth = len(Path(dirpath).parts) - base_depth
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        if depth >= MAX_DEPTH:
            dirnames[:] = []
        out.append(Path(dirpath))
    return out


def read_json(path: Path) -> Any:
    """The JSON value in ``path`` (raises ``ValueError`` when it is not valid JSON)."""
    return json.loads(path.read_text())


def decode(data: bytes) -> Image.Image | None:
    """Encoded image bytes as an RGB PIL image; None when they are not a readable image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception:  # noqa: BLE001
        return None


def images_of(url: str, keys: list[str] | None, limit: int) -> dict[str, Image.Image]:
    """Images of the input ``url`` (a shard or folder) by key: those in ``keys``, or the first ``limit``
    when ``keys`` is None. An unreadable input is logged and gives what was read so far."""
    from dclip_ray.io.sources import iter_records

    want = set(keys) if keys is not None else None
    out: dict[str, Image.Image] = {}
    try:
        for rec in iter_records(url):
            if want is not None and rec.key not in want:
                continue
            if rec.image is not None and (img := decode(rec.image)) is not None:
                out[rec.key] = img
            if len(out) >= (len(want) if want is not None else limit):
                break
    except (InputFileError, OSError) as e:
        log.warning("report: cannot read %s: %s", url, e)
    return out


def find_model_cards(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """``(folder, card)`` of every folder with a ``dclip.json``; an invalid card is ``{"_error": why}``."""
    cards = []
    for d in dirs:
        p = d / "dclip.json"
        if p.is_file():
            try:
                cards.append((d, read_json(p)))
            except ValueError as e:
                cards.append((d, {"_error": f"dclip.json is not valid JSON ({e})"}))
    return cards


def find_used_models(dirs: list[Path], known: list[tuple[Path, dict[str, Any]]],
                     outputs: list[tuple[Path, dict[str, Any] | None]]) -> list[tuple[Path, dict[str, Any]]]:
    """``(folder, card)`` of the local fine-tuned models that the restyle runs among ``dirs`` (their
    ``restyle.json`` names them) and the single-machine ``outputs`` (their summary's ``config``:
    ``models`` or ``finetuned``) were made with, and that ``known`` (the cards found under the run
    folder) lacks: an output folder holds no model, but its report shows how the models were made."""
    named: list[str] = []
    for d in dirs:
        try:
            decl = read_json(d / "restyle.json") if (d / "restyle.json").is_file() else None
        except ValueError:
            continue
        for v in (decl or {}).get("variants") or []:
            named += [str(m) for m in (v.get("models") or [] if isinstance(v, dict) else [])]
    for _, summary in outputs:
        config = (summary or {}).get("config") or {}
        named += [str(m) for m in (config.get("models") or [config.get("finetuned")]) if m]
    have = {d.resolve() for d, _ in known}
    found = []
    for m in named:
        folder = Path(m)
        if is_url(m) or folder.resolve() in have or not (folder / "dclip.json").is_file():
            continue
        have.add(folder.resolve())
        found.extend(find_model_cards([folder]))
    return found


def find_restyle_variants(dirs: list[Path]) -> list[tuple[Path, list[dict[str, Any]]]]:
    """``(folder, commit markers)`` of every folder holding `dclip-ray restyle` shard markers
    (``*_stats.json`` of format :data:`MARKER_FORMAT`)."""
    out = []
    for d in dirs:
        markers = []
        for p in sorted(d.glob("*_stats.json")):
            try:
                m = read_json(p)
            except ValueError:
                continue
            if isinstance(m, dict) and m.get("format") == MARKER_FORMAT:
                markers.append(m)
        if markers:
            out.append((d, markers))
    return out


def find_evals(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, evaluation)`` of every ``eval*.json`` / ``metrics*.json`` with a ``summary`` mapping."""
    out = []
    for d in dirs:
        for p in sorted(d.glob("eval*.json")) + sorted(d.glob("metrics*.json")):
            try:
                e = read_json(p)
            except ValueError:
                continue
            if isinstance(e, dict) and isinstance(e.get("summary"), dict):
                out.append((p, e))
    return out


def _resolved(p: Any) -> str | None:
    return str(Path(str(p)).resolve()) if p and not is_url(str(p)) else None


def _run_summaries(dirs: list[Path]) -> dict[Path, dict[str, Any] | None]:
    """``{folder: summary}`` of the single-machine outputs: ``FOLDER/dclip_run.json`` (translate), or
    ``.FOLDER.edit/dclip_run.json`` beside it (edit keeps FOLDER for the images alone)."""
    runs: dict[Path, dict[str, Any] | None] = {}
    for d in dirs:
        for f in (d / RUN_FILE, d.parent / f".{d.name}.edit" / RUN_FILE):
            if f.is_file():
                try:
                    runs[d] = read_json(f)
                except ValueError:
                    runs[d] = None
                break
    return runs


def find_local_outputs(dirs: list[Path], evals: list[tuple[Path, dict[str, Any]]],
                  ) -> tuple[list[tuple[Path, dict[str, Any] | None]], list[Path]]:
    """Output folders of single-machine commands, and the other image folders (inputs, not shown).

    An output folder has a ``dclip_run.json``, a ``grid.png`` (`edit --grid`) or is the ``after`` of an
    evaluation; a folder that is some run's input (``images`` / ``before``) is not an output.
    """
    runs = _run_summaries(dirs)
    inputs = {_resolved(((s or {}).get("config") or {}).get("images")) for s in runs.values()}
    inputs |= {_resolved(e.get("before")) for _, e in evals}
    afters = {_resolved(e.get("after")): e for _, e in evals}
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
