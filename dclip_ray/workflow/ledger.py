"""The run ledger of `dclip-ray run` (one JSON line per run, local or at an fsspec URL) and the
recording of a run's steps, without Ray."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from typing import Any

import fsspec

from dclip_ray.urls import redact_data

STATUS_OF_CODE = {0: "ok", 1: "config_error", 2: "finished_with_errors", 3: "aborted"}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_ledger(ledger: str, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``ledger`` (local path or fsspec URL; remote files are
    rewritten whole since object stores cannot append)."""
    line = json.dumps(redact_data(record), default=str, sort_keys=False) + "\n"  # no secret of a URL
    fs, path = fsspec.core.url_to_fs(ledger)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
        return
    old = fs.cat_file(path) if fs.exists(path) else b""
    fs.pipe_file(path, old + line.encode())


def read_ledger(ledger: str) -> list[dict[str, Any]]:
    """All run records of a ledger, oldest first (``[]`` when there is none yet)."""
    try:
        with fsspec.open(ledger, "rt", encoding="utf-8") as f:
            return [json.loads(ln) for ln in f if ln.strip()]
    except FileNotFoundError:
        return []


Step = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]]


def stepper(steps: dict[str, Any], say: Callable[[str], None]) -> Step:
    """``step(name, fn)``: run one step, recording it in ``steps`` ("running" while it runs, then its
    result with ``status`` and ``seconds``) and saying one line before and after."""

    def step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        say(f"[{name}] ...")
        t = time.perf_counter()
        steps[name] = {"status": "running"}
        out = fn()
        out.setdefault("status", "ok")
        out["seconds"] = round(time.perf_counter() - t, 2)
        steps[name] = out
        say(f"[{name}] {out['status']}: " + ", ".join(f"{k}={v}" for k, v in out.items()
                                                      if isinstance(v, (int, float)) and not isinstance(v, bool)))
        return out

    return step


def mark_running(steps: dict[str, Any], error: str) -> None:
    for s in steps.values():
        if s.get("status") == "running":
            s["status"] = f"failed: {error}"[:500]
