"""SIGINT and SIGTERM as one exception, so that every command stops the same way (one line, exit code 3).

:func:`interrupt_handlers` makes both signals raise :class:`~dclip_ray.errors.Interrupted` in the main
thread for the length of a command; the CLI catches it, the workflow runner records it in its ledger.
``ray.init`` installs its own SIGTERM handler (it exits with code 1 or 15, the run unrecorded), so the
code that starts Ray runs it inside :func:`deferred_interrupts`, which keeps ours in place; Ray's atexit
hook still shuts the local Ray down.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from dclip_ray.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_previous: dict[int, Any] = {}  # while armed: signal -> the handler it had before


def _raise(signum: int, frame: FrameType | None) -> None:
    del frame
    raise Interrupted(signal.Signals(signum).name)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interrupt_handlers() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise :class:`Interrupted`; the previous handlers come back after.

    Outside the main thread (where Python cannot set handlers) and inside an armed block this changes nothing.
    """
    if not _main_thread() or _previous:
        yield
        return
    for s in SIGNALS:
        _previous[s] = signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in _previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _previous.clear()


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Inside an armed block, for a library call that installs its own handlers and must not be cut in
    half (``ray.init``: its SIGTERM handler exits 1 or 15 with no message, and an exception in the middle
    of it would leave its processes behind): SIGINT and SIGTERM are noted, not raised, and the library's
    handlers for them are not installed; after the block the first noted signal raises
    :class:`Interrupted` (one line, exit 3, Ray shut down by its atexit hook). Elsewhere a no-op."""
    if not _previous or not _main_thread():
        yield
        return
    pending: list[int] = []
    real = signal.signal

    def note(signum: int, frame: FrameType | None) -> None:
        del frame
        pending.append(signum)

    def guarded(signum: Any, handler: Any) -> Any:
        if signum in SIGNALS:  # a library's own handler would decide the exit: ours stay
            return signal.getsignal(signum)
        return real(signum, handler)

    for s in SIGNALS:
        real(s, note)
    signal.signal = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        signal.signal = real  # type: ignore[assignment]
        for s in SIGNALS:
            real(s, _raise)
    if pending:
        raise Interrupted(signal.Signals(pending[0]).name)
