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

import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

import fsspec

from dclip_ray.errors import ConfigError, InputFileError
from dclip_ray.io.manifest import ManifestRow, manifest_bytes
from dclip_ray.io.sources import split_member
from dclip_ray.urls import is_local_fs, redact


def key_problem(key: str, exts: Iterable[str] = ("png",)) -> str | None:
    """Why ``key`` cannot name the members ``key.EXT`` of an output tar (empty, a dot in its last part,
    an absolute or '..' path, or a name too long for the tar format), or None when it can."""
    base = posixpath.basename(key)
    if not key or "." in base or key.startswith("/") or ".." in key.split("/"):
        return f"sample key {key!r} cannot name a WebDataset member (no dots, no absolute or '..' paths); rename it"
    for ext in exts:
        try:
            tarfile.TarInfo(f"{key}.{ext}").tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        except ValueError as e:
            shown = key if len(key) <= 80 else key[:60] + f"...({len(key)} characters)"
            return f"sample key {shown!r} cannot be stored in a tar ({e}); shorten it"
    return None


def _check_key(key: str, exts: Iterable[str] = ("png",)) -> None:
    problem = key_problem(key, exts)
    if problem:
        raise ConfigError(problem)


class HashingFile:
    """A write-only file wrapper that hashes (sha256) and counts every byte written through it, so a
    file's digest is known the moment it is closed, without reading it back."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        """Write ``data`` to the wrapped file and into the digest."""
        self._sha.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def tell(self) -> int:
        """The wrapped file's position (tarfile asks for it)."""
        return self._raw.tell()

    def flush(self) -> None:
        """Flush the wrapped file."""
        self._raw.flush()

    def close(self) -> None:
        """Close the wrapped file."""
        self._raw.close()

    def hexdigest(self) -> str:
        """sha256 (hex) of the bytes written so far."""
        return self._sha.hexdigest()


def _open_tar(path: str) -> tuple[HashingFile, tarfile.TarFile]:
    f = HashingFile(open(path, "wb"))  # noqa: SIM115  (closed by the writer)
    return f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]


class TarShardWriter:
    """A deterministic WebDataset tar written to a local temporary file (upload with :meth:`upload`).

    ``write(key, {ext: bytes})`` adds ``key.ext`` members in sorted extension order; ``mtime``,
    ownership and mode are fixed so identical samples give identical bytes. The tar is hashed while it
    is written: after :meth:`close`, :attr:`sha256` and :attr:`size` describe the file (also after
    :meth:`drop`).
    """

    def __init__(self, tmp_dir: str | None = None):
        fd, self.local_path = tempfile.mkstemp(suffix=".tar", dir=tmp_dir)
        os.close(fd)
        self._file, self._tar = _open_tar(self.local_path)
        self.keys: list[str] = []
        self._closed = False

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample: ``members`` maps extensions (``png``, ``txt``, ``json``) to bytes. A key that
        cannot name its members (:func:`key_problem`) raises :class:`ConfigError` before anything is written."""
        _check_key(key, members)
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)

    def close(self) -> None:
        """Finish the tar (idempotent)."""
        if not self._closed:
            self._tar.close()
            self._file.close()
            self._closed = True

    @property
    def sha256(self) -> str:
        """sha256 (hex) of the finished tar file (closes the tar)."""
        self.close()
        return self._file.hexdigest()

    @property
    def size(self) -> int:
        """Size in bytes of the finished tar file (closes the tar)."""
        self.close()
        return self._file.size

    def upload(self, url: str) -> None:
        """Close and copy the tar to ``url`` (local path or fsspec URL), replacing any previous file."""
        self.close()
        put_file(self.local_path, url)

    def drop(self, keys: set[str]) -> None:
        """Close the tar and rewrite it without the samples of ``keys`` (members keep their order; the
        digest is that of the rewritten file)."""
        self.close()
        fd, tmp = tempfile.mkstemp(suffix=".tar", dir=os.path.dirname(self.local_path))
        os.close(fd)
        f_out, out = _open_tar(tmp)
        with out, tarfile.open(self.local_path, "r:") as src:
            for m in src:
                if split_member(m.name)[0] not in keys:
                    out.addfile(m, src.extractfile(m))
        f_out.close()
        os.replace(tmp, self.local_path)
        self._file = f_out
        self.keys = [k for k in self.keys if k not in keys]

    def discard(self) -> None:
        """Close and delete the local temporary file."""
        self.close()
        if os.path.exists(self.local_path):
            os.remove(self.local_path)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class ShardWriter:
    """One output shard ``ROOT/NAME``: its samples (a :class:`TarShardWriter`), the rejected samples (a
    second one, ``ROOT/rejected/NAME.tar``), a manifest row for every input key, and :meth:`commit`,
    which uploads the tars, then the manifest, then the marker LAST.

    The marker records the counts and the sha256 and size of the tars, hashed while they were written.
    """

    def __init__(self, root: str, shard: str, tmp_dir: str | None = None):
        self.shard = shard
        self.urls = shard_urls(root, shard)
        self.tmp_dir = tmp_dir
        self.tar = TarShardWriter(tmp_dir)
        self.rejected: TarShardWriter | None = None
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
            self.rejected = TarShardWriter(self.tmp_dir)
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
