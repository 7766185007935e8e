"""Writing output WebDataset shards: deterministic tars, uploaded with fsspec, commit marker last.

Per output shard ``NAME`` under an output root (local path or fsspec URL)::

    ROOT/NAME.tar            the samples, members in the order written, fixed metadata (mtime 0,
                             uid/gid 0, mode 0644), so the same samples give byte-identical tars
    ROOT/NAME.parquet        the manifest (see :mod:`dclip_ray.io.manifest`)
    ROOT/NAME_stats.json     the commit marker, written LAST (counts, config hash, sha256 of the tar)
    ROOT/rejected/NAME.tar   the edits scored under ``--min-score``, kept for inspection beside the
                             output, never in it (only when there are some)

:class:`ShardWriter` is the one writer of all three (the tar is hashed while it is written).

A shard without its marker is not done: a re-run rewrites it (all names are deterministic, so a
retried or repeated write replaces, never duplicates).
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import fsspec

from dclip_ray.errors import InputFileError
from dclip_ray.io.containers import HashingFile, SampleContainer, TarShardWriter, key_problem
from dclip_ray.io.manifest import ManifestRow, manifest_bytes
from dclip_ray.urls import is_local_fs, redact

__all__ = ["REJECTED", "HashingFile", "ShardWriter", "TarShardWriter", "key_problem", "list_markers", "put_bytes",
           "put_file", "read_marker", "remove_file", "remove_temporaries", "shard_urls", "write_marker"]


class ShardWriter:
    """One output shard ``ROOT/NAME``: its samples (a :class:`~dclip_ray.io.containers.SampleContainer`,
    the WebDataset tar by default), the rejected samples (a second one, ``ROOT/rejected/NAME.tar``), a
    manifest row for every input key, and :meth:`commit`, which uploads the containers, then the
    manifest, then the marker LAST.

    The marker records the counts and the sha256 and size of the tars, hashed while they were written.
    """

    def __init__(self, root: str, shard: str, tmp_dir: str | None = None,
                 container: Callable[[str | None], SampleContainer] = TarShardWriter):
        self.shard = shard
        self.urls = shard_urls(root, shard)
        self.tmp_dir = tmp_dir
        self.container = container
        self.tar = container(tmp_dir)
        self.rejected: SampleContainer | None = None
        self.rows: list[ManifestRow] = []

    def write(self, key: str, members: Mapping[str, bytes], row: ManifestRow) -> bool:
        """Add one sample (``members``: extension -> bytes) and its ok manifest ``row``; a key the tar
        cannot store (:func:`key_problem`) becomes an error row instead (the rest of the shard goes on).
        Returns True when the sample was written."""
        problem = key_problem(key, members)
        if problem:
            self.error(key, problem)
            return False
        self.tar.write(key, members)
        self.rows.append(row)
        return True

    def reject(self, key: str, members: Mapping[str, bytes], row: ManifestRow) -> bool:
        """Keep one edited sample that scored under the bar in the rejected tar, with its rejected
        manifest ``row`` (never in the output tar); a key the tar cannot store becomes an error row.
        Returns True when the sample was kept."""
        problem = key_problem(key, members)
        if problem:
            self.error(key, problem)
            return False
        if self.rejected is None:
            self.rejected = self.container(self.tmp_dir)
        self.rejected.write(key, members)
        self.rows.append(row)
        return True

    def error(self, key: str, reason: str) -> None:
        """Add an error row for ``key`` (no sample)."""
        self.rows.append(ManifestRow(key, self.shard, "error", error=reason))

    def skip(self, key: str, reason: str) -> None:
        """Add a skipped row for ``key``: this output passes over it on purpose (no sample)."""
        self.rows.append(ManifestRow(key, self.shard, "skipped", error=reason))

    def drop(self, keys: Mapping[str, str]) -> None:
        """Replace everything written for ``keys`` by one error row each (``keys``: key -> reason)."""
        if not keys:
            return
        self.tar.drop(set(keys))
        if self.rejected is not None:
            self.rejected.drop(set(keys))
        self.rows = [r for r in self.rows if r.key not in keys]
        self.rows += [ManifestRow(k, self.shard, "error", error=why) for k, why in keys.items()]

    def counts(self) -> tuple[int, int, int]:
        """``(n_ok, n_error, n_skipped)`` of the rows so far (rejected rows: :attr:`n_rejected`)."""
        n = {s: 0 for s in ("ok", "error", "skipped")}
        for r in self.rows:
            if r.status in n:
                n[r.status] += 1
        return n["ok"], n["error"], n["skipped"]

    @property
    def n_rejected(self) -> int:
        """Rejected rows so far (edits scored under ``--min-score``)."""
        return sum(1 for r in self.rows if r.status == "rejected")

    def write_data(self, order: Mapping[str, int] | None = None) -> None:
        """Upload the tar and the rejected tar (when there are rejected rows; a stale one is removed
        otherwise), then the manifest (rows sorted by ``order[key]`` when given)."""
        if order is not None:
            self.rows.sort(key=lambda row: order[row.key])
        self.tar.upload(self.urls["tar"])
        if self.rejected is not None and self.n_rejected:
            self.rejected.upload(self.urls["rejected"])
        else:
            remove_file(self.urls["rejected"])
        put_bytes(manifest_bytes(self.rows), self.urls["manifest"])

    def write_commit_marker(self, marker: Mapping[str, Any]) -> None:
        """Write the commit marker (the commit: call it after :meth:`write_data`)."""
        write_marker(self.urls["marker"], marker)

    def commit(self, marker: Mapping[str, Any], order: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Upload the tars and the manifest, then the marker: ``marker`` plus ``shard``, ``n``, ``n_ok``,
        ``n_error``, ``n_skipped``, ``n_rejected``, ``tar_sha256`` and ``tar_bytes`` (and the rejected
        tar's ``rejected_sha256``/``rejected_bytes`` when there is one). Returns the marker written."""
        self.write_data(order)
        n_ok, n_error, n_skipped = self.counts()
        n_rejected = self.n_rejected
        full = {**marker, "shard": self.shard, "n": n_ok + n_error + n_skipped + n_rejected, "n_ok": n_ok,
                "n_error": n_error, "n_skipped": n_skipped, "n_rejected": n_rejected,
                "tar_sha256": self.tar.sha256, "tar_bytes": self.tar.size}
        if n_rejected and self.rejected is not None:
            full.update(rejected_sha256=self.rejected.sha256, rejected_bytes=self.rejected.size)
        self.write_commit_marker(full)
        return full

    def discard(self) -> None:
        """Delete the local temporary tars."""
        self.tar.discard()
        if self.rejected is not None:
            self.rejected.discard()


def remove_file(url: str) -> None:
    """Delete the file at ``url`` when it is there (its folder stays: another shard's writer may be
    writing into it)."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        if fs.exists(path):
            fs.rm(path)
    except FileNotFoundError:
        pass


def put_file(local: str, url: str) -> None:
    """Copy a local file to ``url``; on a local filesystem through a temporary name and a rename."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local_fs(fs):
        tmp = f"{path}{TMP_MARK}{os.getpid()}"
        fs.put_file(local, tmp)
        os.replace(tmp, path)
    else:
        fs.put_file(local, path)


TMP_MARK = ".tmp-"  # ``NAME.tmp-PID``: a local write in progress (renamed to NAME when complete)


def put_bytes(data: bytes, url: str) -> None:
    """Write ``data`` at ``url`` (atomically on a local filesystem, as :func:`put_file`)."""
    fd, tmp = tempfile.mkstemp()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        put_file(tmp, url)
    finally:
        os.remove(tmp)


def shard_urls(root: str, shard: str) -> dict[str, str]:
    """``{"tar", "manifest", "marker", "rejected"}`` URLs of output shard ``shard`` under ``root``."""
    base = root.rstrip("/")
    return {"tar": f"{base}/{shard}.tar", "manifest": f"{base}/{shard}.parquet",
            "marker": f"{base}/{shard}_stats.json", "rejected": f"{base}/{REJECTED}/{shard}.tar"}


REJECTED = "rejected"
"""The sub-folder of an output folder that keeps the rejected edits (``rejected/NAME.tar``)."""


def write_marker(url: str, marker: Mapping[str, Any]) -> None:
    """Write a commit marker (JSON, sorted keys): call it LAST, after the data it vouches for.
    String values are stripped of credentials (:func:`dclip_ray.urls.redact`)."""
    clean = {k: redact(v) if isinstance(v, str) else v for k, v in marker.items()}
    put_bytes(json.dumps(clean, indent=1, sort_keys=True, default=str).encode(), url)


def read_marker(url: str) -> dict[str, Any] | None:
    """A commit marker, or None when it is absent or unreadable (the shard is then not committed)."""
    try:
        with fsspec.open(url, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def list_markers(root: str) -> list[str]:
    """Names of the shards under ``root`` that have a commit marker, sorted. Raises
    :class:`InputFileError` when ``root`` cannot be listed (credentials, permissions)."""
    fs, path = fsspec.core.url_to_fs(root)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001  (credentials, permissions, network: one line, exit 1)
        raise InputFileError(f"{redact(root)}: cannot be listed ({type(e).__name__}: {redact(e)}); check the URL "
                             "and credentials") from None
    return sorted(posixpath.basename(n)[: -len("_stats.json")] for n in names if n.endswith("_stats.json"))


def is_temporary(name: str) -> bool:
    """True for the name of a local write in progress or left over by a crash (``NAME.tmp-PID``)."""
    base = posixpath.basename(name)
    return TMP_MARK in base and base.rsplit(TMP_MARK, 1)[1].isdigit()


def list_temporaries(root: str, shard: str | None = None) -> list[str]:
    """Paths of leftover temporaries (:func:`is_temporary`) directly under ``root``, optionally only
    those of output shard ``shard``; sorted. A missing ``root`` has none."""
    fs, path = fsspec.core.url_to_fs(root)
    try:
        names = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [n for n in names if is_temporary(n)]
    if shard is not None:
        found = [n for n in found if posixpath.basename(n).startswith((f"{shard}.", f"{shard}_"))]
    return sorted(found)


def remove_temporaries(root: str, shard: str) -> list[str]:
    """Delete the leftover temporaries of output shard ``shard`` under ``root`` (call it while holding
    the shard's lease: no live writer owns them then). Returns the paths removed."""
    fs, _ = fsspec.core.url_to_fs(root)
    gone = list_temporaries(root, shard)
    for p in gone:
        try:
            fs.rm(p)
        except FileNotFoundError:
            pass
    return gone
