"""What the user sees: consoles that suit a terminal and a log file alike (:func:`to_stdout`, :func:`to_stderr`), and
Ray's native log lines kept off stderr (without ``--verbose``).

Ray's C++ core worker in the driver process writes its own log lines straight to file descriptor 2
(``[2026-12-02 01:21:55,290 E 25387 25387] core_worker.cc:2465: Actor ... has constructor arguments in
the object store ...``): an ``E`` that is no error of ours, and no Python setting silences it (setting
``RAY_BACKEND_LOG_LEVEL`` prints an ``I`` line saying so). :func:`filter_native_logs` puts a pipe under
fd 2 and drops exactly those lines; everything Python writes (progress bars, warnings, our one-line
errors) goes to the terminal directly.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from typing import Any

RAY_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")
"""A native Ray log line (glog/spdlog format: time, level, pid, tid)."""

_installed = False
_pump_thread: threading.Thread | None = None


def _pump(read_fd: int, write_fd: int) -> None:
    """Copy the pipe to the real stderr line by line, dropping native Ray log lines."""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not RAY_LOG_LINE.match(line))
            if out:
                os.write(write_fd, out)
        if pending and not RAY_LOG_LINE.match(pending):
            os.write(write_fd, pending)


def filter_native_logs(force: bool = False) -> bool:
    """Drop Ray's native log lines from fd 2 for the rest of the process, when stderr is a terminal (or
    ``force``: the CLI process itself, whose stderr may be a log file); Python's ``sys.stderr`` is re-pointed at the real stderr so it bypasses the filter.
    Returns True when the filter is (now) installed."""
    global _installed, _pump_thread
    if _installed:
        return True
    if not (force or sys.stderr.isatty()):
        return False
    sys.stderr.flush()
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _pump_thread = threading.Thread(target=_pump, args=(read_fd, real), daemon=True, name="ray-log-filter")
    _pump_thread.start()
    sys.stderr = io.TextIOWrapper(os.fdopen(real, "wb", buffering=0), write_through=True,
                                  encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace")
    _installed = True
    return True


def drain_native_logs(timeout: float = 1.0) -> None:
    """Before the process ends: close our end of the filter's pipe (fd 2) and give the filter up to
    ``timeout`` seconds to pass on what is still in it (processes Ray started may hold the pipe open:
    their lines are not waited for). Nothing when the filter is not installed."""
    if _pump_thread is None:
        return
    try:
        os.close(2)
    except OSError:
        pass
    _pump_thread.join(timeout)


def _console(stderr: bool, width: int | None) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, width=width, highlight=False)
    # off a terminal (a pipe, a file, CI): rich would assume 80 columns, wrap lines mid-path and cut
    # table cells with '…'; a log wants each line whole and no colour codes
    return Console(stderr=stderr, width=LOG_WIDTH, soft_wrap=True, no_color=True, highlight=False, emoji=False)


LOG_WIDTH = 100_000
"""Off a terminal the console is this wide: no line is wrapped and no table cell truncated."""


def to_stdout(width: int | None = None) -> Any:
    """A rich console on stdout for tables and summaries: as rich makes it on a terminal (``width``
    columns when given); off a terminal no wrapping, no truncation, no colour."""
    return _console(False, width)


def to_stderr() -> Any:
    """The same on stderr, for warnings and per-item problems."""
    return _console(True, None)
