"""Progress of long work: a tqdm bar on a terminal, plain lines off it (CI logs, pipes, files).

A bar redrawn with carriage returns is unreadable in a log file, and no output at all for minutes
looks like a hang. So off a terminal :func:`progress` gives a :class:`PlainProgress`: one line
``DESC: N/TOTAL UNIT, 1m30s elapsed, ETA 4m10s (loss 0.12)`` on stderr when the count moved in the last
:data:`LINE_EVERY_S` seconds, and at least every :data:`SILENT_AT_MOST_S` seconds while the work runs,
from a daemon thread (it never keeps a process alive). Work that ends before the first line prints
nothing at all; work that printed a line prints a last one when it ends.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

LINE_EVERY_S = 30.0
"""Off a terminal: a line at most this often while the count moves."""

SILENT_AT_MOST_S = 60.0
"""Off a terminal: a line at least this often while the work runs, moving or not."""


def on_terminal() -> bool:
    """True when stderr (where progress goes) is a terminal."""
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60
                                                                             else f"{s}s")


class PlainProgress:
    """tqdm's small interface (``update``, ``set_postfix``, ``close``, a context manager) as plain,
    throttled lines on ``stream`` (default: ``sys.stderr`` when the first line is written).

    ``total`` may be None (a count without an end). ``every``/``silent`` override
    :data:`LINE_EVERY_S`/:data:`SILENT_AT_MOST_S` (tests)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 stream: TextIO | None = None, every: float = LINE_EVERY_S, silent: float = SILENT_AT_MOST_S) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream, self.every, self.silent = stream, every, silent
        self.postfix = ""
        self.start = self._last_line = time.monotonic()
        self._n_at_last_line = initial
        self._lines = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"progress-{desc}")
        self._thread.start()

    def line(self) -> str:
        """The current state as one line (no newline)."""
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        elapsed = time.monotonic() - self.start
        text = f"{self.desc}: {count} {self.unit}, {_duration(elapsed)} elapsed"
        if self.total is not None and 0 < self.n < self.total:  # the whole job's pace so far
            text += f", ETA {_duration(elapsed / self.n * (self.total - self.n))}"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def _emit(self) -> None:
        with self._lock:
            print(self.line(), file=self.stream or sys.stderr, flush=True)
            self._last_line, self._n_at_last_line = time.monotonic(), self.n
            self._lines += 1

    def _watch(self) -> None:
        step = min(self.every, self.silent)
        while not self._stop.wait(step):
            since = time.monotonic() - self._last_line
            if (self.n != self._n_at_last_line and since >= self.every) or since >= self.silent:
                self._emit()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Show ``key value`` pairs after the count (floats with 4 significant digits)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items.items())

    def close(self) -> None:
        """Stop the line thread; a last line when any line was printed (so the log shows the end)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._lines and self.n != self._n_at_last_line:
            self._emit()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, enabled: bool = True, unit: str = "it", initial: int = 0) -> Any:
    """A progress counter for ``total`` units of work: a tqdm bar on a terminal, a
    :class:`PlainProgress` off it, a disabled tqdm (nothing shown) when not ``enabled``."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if on_terminal():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return PlainProgress(total, desc, unit=unit, initial=initial)


def inner_steps(items: Iterable[Any], desc: str, enabled: bool = True) -> Iterator[Any]:
    """Iterate ``items`` with a transient tqdm bar on a terminal (the steps of one sampling call);
    nothing off a terminal, where the outer work's lines say enough."""
    return iter(tqdm(items, disable=not (enabled and on_terminal()), desc=desc, leave=False))
