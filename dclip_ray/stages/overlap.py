"""Overlap of a restyle actor's CPU work with its UNet work: the next batches are read and decoded in
one background thread while the current one is inverted and generated, and the finished batches are
encoded, hashed and written in another, in order (:class:`Lane`). Both are bounded (``depth`` batches),
so memory stays at most ``2 x depth`` batches of images beyond the one in the UNet; ``depth`` 0 runs
everything in the caller's thread, one step after the other.

On a GPU the UNet is fast and the PNG codec, the hashing and the tar writing would otherwise leave it
idle between batches; PIL's codecs, zlib and hashlib release the GIL, so plain threads suffice.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_END = object()


class Lane:
    """Runs submitted calls one at a time, in the order submitted, in one background thread.

    At most ``depth`` calls wait: :meth:`submit` blocks beyond that (back-pressure). ``depth`` 0 runs
    each call at once in the caller's thread. The first error a call raises is raised again by the next
    :meth:`submit` or by :meth:`join`; the calls after it are dropped. Use as a context manager: leaving
    it stops the thread (pending calls are dropped when leaving on an error).
    """

    def __init__(self, depth: int, name: str = "dclip-lane"):
        self.depth = max(0, int(depth))
        self._error: BaseException | None = None
        self._stop = False
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.depth or 1)
        self._thread: threading.Thread | None = None
        if self.depth:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _END:
                    return
                if self._error is None and not self._stop:
                    fn, args, kwargs = item
                    fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001  (handed to the submitting thread)
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._stop = True  # the calls after a failed one never run
            raise error

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` after the calls submitted before it (at once when ``depth`` is 0)."""
        if self._thread is None:
            fn(*args, **kwargs)
            return
        self._raise()
        if self._stop:
            raise RuntimeError("submit to a stopped lane")
        self._queue.put((fn, args, kwargs))

    def join(self) -> None:
        """Wait until every submitted call has run; raise the first error one of them raised."""
        if self._thread is not None:
            self._queue.join()
        self._raise()

    def close(self, drop: bool = False) -> None:
        """Stop the thread after the calls already submitted (``drop``: without running them)."""
        if self._thread is None:
            return
        self._stop = self._stop or drop
        self._queue.put(_END)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.close(drop=kind is not None)


def prefetched(items: Iterable[T], depth: int, name: str = "dclip-prefetch") -> Iterator[T]:
    """The items of ``items`` in order, produced in a background thread at most ``depth`` ahead of the
    consumer (``depth`` 0: produced here, on demand). An error raised while producing is raised here, in
    place of the item it stopped at. Closing the iterator early stops the producer (and closes ``items``
    when it is a generator)."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            put((_END, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()
