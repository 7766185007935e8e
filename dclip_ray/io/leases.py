"""Leases: one writer per output shard. A run takes ``ROOT/NAME.lease`` before it writes shard ``NAME``
and renews it while it works (:class:`LeaseKeeper`); another run leaves a shard with a live lease alone.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import time
from typing import Any

import fsspec

from dclip_ray.io.shards import put_bytes
from dclip_ray.urls import is_local_fs

log = logging.getLogger(__name__)

LEASE_TTL_S = 120.0  # a lease not renewed for this long is dead (the run that held it crashed)


def new_owner() -> str:
    """A fresh lease owner naming this run: ``RUNID:HOST:PID`` of the driver that started it (a worker
    on the same host can tell when that process is gone, so a crashed run's shards are free at once)."""
    import uuid

    return f"{uuid.uuid4().hex[:12]}:{socket.gethostname()}:{os.getpid()}"


def lease_url(root: str, shard: str) -> str:
    """URL of the lease of output shard ``shard`` under ``root``."""
    return f"{root.rstrip('/')}/{shard}.lease"


def _read_lease(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """The lease's JSON object, or None when there is no file or it holds no JSON object."""
    try:
        with fs.open(path, "rb") as f:
            held = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None


def _owner_gone(owner: str) -> bool:
    """True when ``owner`` (``RUNID:HOST:PID``) names a process of this host that no longer runs."""
    parts = str(owner).rsplit(":", 2)
    if len(parts) != 3 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def _age(fs: fsspec.AbstractFileSystem, path: str) -> float | None:
    """Seconds since the lease file was last written (None: no such file, or the store gives no time)."""
    try:
        info = fs.info(path)
    except (FileNotFoundError, OSError):
        return None
    stamp = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if stamp is None:
        return None
    if hasattr(stamp, "timestamp"):
        stamp = stamp.timestamp()
    try:
        return max(0.0, time.time() - float(stamp))
    except (TypeError, ValueError):
        return None


def _expires(held: dict[str, Any]) -> float:
    try:
        return float(held.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0


def _live(held: dict[str, Any] | None, owner: str, age: float | None = None, ttl: float = LEASE_TTL_S) -> bool:
    """A lease another run holds: not expired by its own word, not older than ``ttl`` since its file was
    last written (a lease claiming a far expiry is not renewed by anyone after ``ttl``), its driver not
    known to be gone."""
    return (isinstance(held, dict) and held.get("owner") != owner and _expires(held) > time.time()
            and (age is None or age < ttl) and not _owner_gone(str(held.get("owner"))))


def _unreadable(age: float | None, ttl: float, notes: list[str] | None = None) -> dict[str, Any] | None:
    """An existing lease file that cannot be read (empty, not JSON, cut): held for ``ttl`` after it was
    written (a run may be writing it right now), then None: taken over, with a warning (logged, and added
    to ``notes`` for the caller to report)."""
    if age is not None and age >= ttl:
        note = f"its lease file was unreadable and {age:.0f} s old (over {ttl:.0f} s): taken over"
        log.warning("lease %s", note)
        if notes is not None:
            notes.append(note)
        return None
    left = ttl - (age or 0.0)
    return {"owner": "unknown (unreadable lease file)", "expires": time.time() + left}


def acquire_lease(root: str, shard: str, owner: str, ttl: float = LEASE_TTL_S,
                  notes: list[str] | None = None) -> dict[str, Any] | None:
    """Take (or renew) the lease of output shard ``shard`` for ``owner`` (:func:`new_owner`). Returns
    None when taken, or the lease of the live run that holds it (``{"owner", "host", "pid", "expires"}``).

    A lease lives ``ttl`` seconds after it was last taken or renewed (:class:`LeaseKeeper` renews it
    while a shard is worked on). An expired lease (by its ``expires`` or by its file's age: a far
    ``expires`` nobody renews ends too), one whose driver process is gone from this host, one of the
    same owner (a retried task of the same run), and a lease file that cannot be read once it is older
    than ``ttl`` (with a warning) are taken over. On a local filesystem the
    lease is created atomically (``O_CREAT | O_EXCL``); on an object store the check and the write are
    two requests, so two runs starting on one shard in the same instant may both work on it. Either way
    every write is idempotent (deterministic names, marker last): a lease saves duplicate work, it is
    not what keeps keys exactly once. A takeover of an unreadable lease file appends a line to ``notes``.
    """
    fs, path = fsspec.core.url_to_fs(lease_url(root, shard))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    mine = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + ttl}
    data = json.dumps(mine, sort_keys=True).encode()
    held, age = _read_lease(fs, path), _age(fs, path)
    if _live(held, owner, age, ttl):
        return held
    if held is None and age is not None:  # the file is there but says nothing readable
        blocked = _unreadable(age, ttl, notes)
        if blocked is not None:
            return blocked
    elif is_local_fs(fs) and held is None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another run won the race
            return _read_lease(fs, path) or _unreadable(0.0, ttl)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return None
    put_bytes(data, lease_url(root, shard))  # a takeover, a renewal, or an object store
    return None


def live_lease(root: str, shard: str) -> dict[str, Any] | None:
    """The lease of ``shard`` under ``root`` while a live run holds it (not expired, its driver not
    gone from this host), else None."""
    fs, path = fsspec.core.url_to_fs(lease_url(root, shard))
    held, age = _read_lease(fs, path), _age(fs, path)
    if held is None:
        return _unreadable(age, LEASE_TTL_S) if age is not None and age < LEASE_TTL_S else None
    return held if _live(held, "", age) else None


def release_lease(root: str, shard: str, owner: str) -> None:
    """Remove the lease of ``shard`` if ``owner`` holds it (another run's lease is left alone)."""
    fs, path = fsspec.core.url_to_fs(lease_url(root, shard))
    held = _read_lease(fs, path)
    if held is not None and held.get("owner") == owner:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass


class LeaseKeeper:
    """``with LeaseKeeper(root, shard, owner) as held:`` takes the lease (``held`` is None) or names the
    run holding it; while the block runs a daemon thread renews it every ``ttl / 4`` s, and it is
    released at the end. A process that dies stops renewing, so its lease expires after ``ttl``."""

    def __init__(self, root: str, shard: str, owner: str, ttl: float = LEASE_TTL_S):
        import threading

        self.root, self.shard, self.owner, self.ttl = root, shard, owner, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{shard}")
        self.held: dict[str, Any] | None = None
        self.notes: list[str] = []  # what taking the lease had to override (an unreadable lease file)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                acquire_lease(self.root, self.shard, self.owner, self.ttl)
            except Exception:  # noqa: BLE001  (a failed renewal only shortens the lease)
                pass

    def __enter__(self) -> dict[str, Any] | None:
        self.held = acquire_lease(self.root, self.shard, self.owner, self.ttl, self.notes)
        if self.held is None:
            self._thread.start()
        return self.held

    def __exit__(self, *exc: object) -> None:
        if self.held is None:
            self._stop.set()
            self._thread.join()
            release_lease(self.root, self.shard, self.owner)
